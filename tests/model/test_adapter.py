"""Adapter tensors in and out of a PEFT model: the direct parameter path agrees with PEFT's own."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model_state_dict

from fedft.config import load_config
from fedft.model.adapter import adapter_parameters, get_adapter_state, set_adapter_state
from fedft.model.load import load_peft_model, model_spec


@pytest.fixture(scope="module")
def model(tiny_model_dir, tmp_path_factory):
    from tests.conftest import write_tiny_setup

    return load_peft_model(model_spec(load_config(write_tiny_setup(tmp_path_factory.mktemp("adapter"),
                                                                   tiny_model_dir))))


def test_reading_the_adapter_gives_what_peft_gives(model):
    assert adapter_parameters(model) is not None  # the direct path is the one in use
    peft_state = get_peft_model_state_dict(model)
    state = get_adapter_state(model)
    assert list(state) == sorted(peft_state)
    assert all(torch.equal(state[k], peft_state[k].float()) and state[k].data_ptr() != peft_state[k].data_ptr()
               for k in state)  # copies, not views of the model


def test_writing_the_adapter_is_what_peft_then_reads(model):
    new = {k: torch.randn_like(v) for k, v in get_adapter_state(model).items()}
    set_adapter_state(model, new)
    peft_state = get_peft_model_state_dict(model)
    assert all(torch.equal(peft_state[k], new[k]) for k in new)
    new[next(iter(new))] += 1.0  # the caller's tensors stay theirs
    assert not all(torch.equal(peft_state[k], new[k]) for k in new)


def test_a_mismatched_adapter_is_refused_by_name_and_shape(model):
    state = get_adapter_state(model)
    first = next(iter(state))
    with pytest.raises(ValueError, match="missing"):
        set_adapter_state(model, {k: v for k, v in state.items() if k != first})
    with pytest.raises(ValueError, match=f"adapter tensor {first}: shape"):
        set_adapter_state(model, {**state, first: state[first][:1]})


def test_a_new_adapter_on_the_model_finds_its_parameters_again(model):
    before = adapter_parameters(model)
    model.add_adapter("other", model.peft_config["default"])
    try:
        after = adapter_parameters(model)
        assert after is not before and set(after) == set(before)
    finally:
        model.delete_adapter("other")
        model.set_adapter("default")


def test_a_checkpoint_without_the_model_card_holds_the_same_adapter(model, tmp_path):
    from safetensors.torch import load_file

    from fedft.model.adapter import save_adapter

    state = {k: torch.randn_like(v) for k, v in get_adapter_state(model).items()}
    save_adapter(model, state, tmp_path / "final")
    save_adapter(model, state, tmp_path / "checkpoint", {"round.json": b"{}"}, model_card=False)
    final, checkpoint = tmp_path / "final", tmp_path / "checkpoint"
    assert (final / "README.md").is_file() and not (checkpoint / "README.md").exists()
    assert sorted(p.name for p in checkpoint.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                           "round.json"]
    assert (checkpoint / "adapter_config.json").read_text() == (final / "adapter_config.json").read_text()
    saved = load_file(checkpoint / "adapter_model.safetensors")
    reference = load_file(final / "adapter_model.safetensors")
    assert saved.keys() == reference.keys() and all(torch.equal(saved[k], reference[k]) for k in saved)
    assert "create_or_update_model_card" not in vars(model)  # PEFT's own method is back
    save_adapter(model, state, tmp_path / "again")
    assert (tmp_path / "again" / "README.md").is_file()
