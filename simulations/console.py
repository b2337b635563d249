"""What ``fedft simulate`` prints: fedft's own lines and errors; third-party noise with ``--verbose``.

A simulated run loads torch, transformers, peft, bitsandbytes, TRL, pyarrow, flwr-datasets,
Ray and Flower in this process and again in every Ray actor (one per simulated client),
and they print deprecation notices, tips and progress bars that a person running a
simulation cannot act on. ``quiet_third_party(verbose=False)`` hides them while the run
lasts:

* in this process, a ``warnings.showwarning`` that drops the hidden warnings (filters
  alone would not do: importing flwr puts its own "show each DeprecationWarning once"
  filter first) and third-party loggers at ERROR;
* for the Ray actors, which inherit this process's environment when Ray starts, the same
  warnings as ``PYTHONWARNINGS`` entries, the libraries' own switches
  (``TRANSFORMERS_VERBOSITY``, ``HF_HUB_DISABLE_PROGRESS_BARS``, ``TQDM_DISABLE``, ...) and
  ``FEDFT_QUIET_LOGGERS``, the loggers that clients/app.py sets to ERROR when an actor
  imports it.

What stays: every line fedft prints, fedft's own warnings, every exception and traceback,
and ERROR records of any logger, so a crashing client's cause still reaches the console
(Flower logs it at ERROR, and fedft names the failed clients). The hidden warnings are
deprecations addressed to whoever maintains the calling code (``HIDDEN_CATEGORIES``) and
the third-party warnings listed in ``HIDDEN_MESSAGES``. With ``verbose=True`` nothing
changes and the console shows everything.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator

# deprecations for the maintainers of the calling code, e.g. torch.jit's script_method,
# transformers' is_gradient_checkpointing, pyarrow's SortOptions null_placement (flwr-datasets)
# and Ray's accelerator-visible-devices tip
HIDDEN_CATEGORIES: tuple[type[Warning], ...] = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)

# other third-party warnings: (category, start of the message, matched case-insensitively;
# no "," or ":", which PYTHONWARNINGS cannot carry)
HIDDEN_MESSAGES: tuple[tuple[type[Warning], str], ...] = (
    # Opacus' PrivacyEngine without secure_mode, once per client actor: fedft hands DP-SGD its
    # own noise generator, seeded from the OS CSPRNG every round (fedft.privacy.dpfedavg)
    (UserWarning, "Secure RNG turned off"),
    # torch, from the per-sample-gradient hooks Opacus puts on the LoRA layers, whose inputs
    # (the frozen base's activations) do not require gradients
    (UserWarning, "Full backward hook is firing when gradients are computed"),
)

# WARNING and INFO records of these loggers are hidden, ERROR records stay: Flower's
# "DEPRECATED FEATURE: The `run_simulation` function is deprecated" and "Federated evaluation
# will be skipped", bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community",
# Ray's start-up lines, transformers', TRL's and Opacus' advice
QUIET_LOGGERS: tuple[str, ...] = (
    "flwr", "ray", "bitsandbytes", "transformers", "peft", "trl", "accelerate", "opacus",
    "datasets", "huggingface_hub", "torch", "absl",
)

# the libraries' own switches, read when each is imported; a value set by the user is kept
QUIET_ENV: dict[str, str] = {
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' "Loading weights" bar
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TQDM_DISABLE": "1",  # flwr-datasets' "Generating partition_id_to_indices" bar
}

LOGGERS_ENV = "FEDFT_QUIET_LOGGERS"  # read by clients/app.py in each Ray actor

DIGEST = "fedft: third-party warnings, logs and progress bars hidden; --verbose shows them"


def pythonwarnings() -> str:
    """The hidden warnings as ``PYTHONWARNINGS`` entries (``action:message:category``)."""
    entries = [f"ignore::{category.__name__}" for category in HIDDEN_CATEGORIES]
    for category, message in HIDDEN_MESSAGES:
        if "," in message or ":" in message:
            raise ValueError(f"a PYTHONWARNINGS message prefix cannot hold ',' or ':': {message!r}")
        entries.append(f"ignore:{message}:{category.__name__}")
    return ",".join(entries)


def is_hidden(category: type[Warning], message: Warning | str) -> bool:
    """Whether quiet mode hides this warning."""
    if issubclass(category, HIDDEN_CATEGORIES):
        return True
    text = str(message).lower()
    return any(issubclass(category, hidden) and text.startswith(prefix.lower())
               for hidden, prefix in HIDDEN_MESSAGES)


def quiet_environment() -> dict[str, str]:
    """The environment variables quiet mode sets (given the current environment)."""
    env = {name: value for name, value in QUIET_ENV.items() if name not in os.environ}
    own = pythonwarnings()
    current = os.environ.get("PYTHONWARNINGS", "")
    if not current or own in current:
        env["PYTHONWARNINGS"] = current or own
    else:  # later entries take precedence, so these come after the user's own
        env["PYTHONWARNINGS"] = f"{current},{own}"
    env[LOGGERS_ENV] = ",".join(QUIET_LOGGERS)
    return env


def quiet_loggers() -> None:
    """Set the third-party loggers to ERROR; again after importing flwr, which sets its own to DEBUG."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def quiet_third_party(verbose: bool) -> Iterator[dict[str, str]]:
    """Hide third-party warnings, logs and progress bars inside the block unless ``verbose``.

    Enter it before Ray starts (the actors inherit the environment then) and, for this
    process's progress bars, before tqdm and transformers are imported. Yields the
    environment variables it set (none when ``verbose``); on exit the environment, the
    warning filters and ``showwarning``, and the logger levels are as before.
    """
    if verbose:
        yield {}
        return
    env = quiet_environment()
    saved_env = {name: os.environ.get(name) for name in env}
    saved_levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    with warnings.catch_warnings():
        shown = warnings.showwarning

        def showwarning(message, category, filename, lineno, file=None, line=None):
            if not is_hidden(category, message):
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = showwarning
        os.environ.update(env)
        quiet_loggers()
        try:
            yield env
        finally:
            for name, value in saved_env.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            for name, level in saved_levels.items():
                logging.getLogger(name).setLevel(level)
