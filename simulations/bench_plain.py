"""The benchmark's reference (``python -m simulations.bench``, figure (a)): a plain transformers +
peft + bitsandbytes training loop with no fedft and no Flower in it, run in its own process.
"""

from __future__ import annotations

import time
from pathlib import Path


def plain_loop(config_path: Path) -> dict:
    """transformers + peft + bitsandbytes, no fedft in the loop: the simulated client's rounds back to back.

    The same model, quantization, LoRA, threads, tokenized examples and batch indices as client 0
    of the simulation (fedft's data preparation, batch order and dropout seeds are reused; loading,
    the optimizer and the steps are written out here). Returns the load time, every step's time and
    every step's loss (each round's mean is the simulated client's training loss when the two did
    the same arithmetic).
    """
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from fedft.config import load_config
    from fedft.data.partition import partition_dataset
    from fedft.data.rows import collate, load_row_files, tokenize_dataset
    from fedft.federated.client_round import client_seed
    from fedft.model.load import lora_targets  # fedft's choice of layers (experts of a MoE base stay frozen)
    from fedft.train.local import batch_indices

    cfg = load_config(config_path)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    device = torch.device("cuda:0" if cfg.model.device == "auto" and torch.cuda.is_available()
                          else "cpu" if cfg.model.device == "auto" else cfg.model.device)
    dtype = getattr(torch, cfg.model.compute_dtype)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(cfg.model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_use_double_quant=cfg.model.double_quant, bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(cfg.model_path, quantization_config=quant, dtype=dtype,
                                                 device_map={"": device})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.model.gradient_checkpointing,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(cfg.seed)  # LoRA's initialisation, as fedft seeds it
    model = get_peft_model(model, LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                             target_modules=lora_targets(model, cfg.lora.target_modules),
                                             task_type="CAUSAL_LM"))
    model.config.use_cache = False
    load_s = time.perf_counter() - started
    all_rows = load_row_files(cfg.data.train_files, cfg.data.columns)
    rows = partition_dataset(all_rows, cfg.data, cfg.simulation.num_supernodes)[0]  # client 0's part
    examples = tokenize_dataset(rows, tokenizer, cfg.data)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    step_s, losses = [], []
    for round_index in range(1, cfg.strategy.num_rounds + 1):
        optimizer = torch.optim.AdamW(params, lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay)
        seed = client_seed(cfg.seed, round_index, 0)
        batches = batch_indices(len(examples), cfg.train.batch_size, seed)
        torch.manual_seed(seed)  # LoRA dropout, as the client seeds it: the same arithmetic, step for step
        for _ in range(cfg.train.local_steps):
            t0 = time.perf_counter()
            batch = {k: v.to(device) for k, v in collate([examples[i] for i in next(batches)],
                                                         tokenizer.pad_token_id).items()}
            loss = model(**batch).loss
            losses.append(loss.item())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            step_s.append(time.perf_counter() - t0)
    return {"load_s": load_s, "step_s": step_s, "losses": losses, "examples": len(examples)}
