"""Typed, frozen configuration for every fedft run, loaded from TOML with ``--set`` overrides.

One ``FedftConfig`` drives simulation, baselines and deployment alike. A wrong value fails
at load time with the file and line, the field, the bad value and what is allowed. Paths in
a config file are resolved relative to that file. This module does no I/O beyond reading
the TOML file and imports nothing heavy.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEMO_MODEL = "demo"
DEMO_MODEL_DIR = Path(__file__).parent / "assets" / "demo-base"
DEMO_WEIGHTS = "model.safetensors"


def demo_model_dir() -> Path:
    """Where the embedded demo model's weights are.

    Normally beside this module. A Flower app bundle (``flwr run .``) carries only source
    and text files, so its copy of fedft has no weights; the installed fedft distribution
    (a regular or an editable install) still has them.
    """
    if (DEMO_MODEL_DIR / DEMO_WEIGHTS).is_file():
        return DEMO_MODEL_DIR
    import json
    from importlib import metadata

    candidates = []
    try:
        dist = metadata.distribution("fedft")
        candidates.append(Path(str(dist.locate_file("fedft/assets/demo-base"))))
        direct_url = json.loads(dist.read_text("direct_url.json") or "{}")
        if direct_url.get("url", "").startswith("file://"):
            candidates.append(Path(direct_url["url"][len("file://"):]) / "fedft" / "assets" / "demo-base")
    except metadata.PackageNotFoundError:
        pass
    for candidate in candidates:
        if (candidate / DEMO_WEIGHTS).is_file():
            return candidate
    raise ConfigError(
        f"model.path = 'demo': no {DEMO_WEIGHTS} in {DEMO_MODEL_DIR} nor in an installed fedft; "
        "install fedft (pip install -e .) or rebuild the model with `fedft demo build-base --out DIR` "
        "and set model.path to DIR"
    )


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


@dataclass(frozen=True)
class ModelConfig:
    """Which base model to load and how."""

    path: str = DEMO_MODEL  # "demo" (the embedded tiny Llama), a local directory, or a hub id
    quantization: str = "nf4"  # nf4 | int8 | none
    compute_dtype: str = "float32"  # float32 | bfloat16 | float16
    double_quant: bool = True
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False


@dataclass(frozen=True)
class LoraConfig:
    """The LoRA adapter every client trains."""

    r: int = 16  # the global adapter's rank (the largest any client may train)
    alpha: float = 32.0  # scaling alpha / r; a client of lower rank scales alpha with its rank
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("all-linear",)
    client_ranks: tuple[int, ...] = ()  # simulation: rank per partition id (empty: all r)


@dataclass(frozen=True)
class DataConfig:
    """Where the training and held-out data live and how simulated institutions split it."""

    train_files: tuple[str, ...] = ()
    eval_file: str = ""
    partition: str = "natural"  # iid | dirichlet | natural
    partition_by: str = "institution"  # column for natural, label column for dirichlet
    dirichlet_alpha: float = 0.5
    task_column: str = "task"  # held-out rows are scored per value of this column, if present
    max_length: int = 256
    eval_max_examples: int = 200
    seed: int = 0


@dataclass(frozen=True)
class TrainConfig:
    """The local training loop run by each client every round."""

    local_steps: int = 20
    batch_size: int = 16
    grad_accum: int = 1
    learning_rate: float = 1e-3
    lr_schedule: str = "cosine"  # constant | linear | cosine, across all rounds
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    num_threads: int = 0  # torch threads per client process; 0 keeps torch's default


@dataclass(frozen=True)
class StrategyConfig:
    """How the server combines clients (or which baseline replaces federation)."""

    name: str = "fedavg"  # fedavg | fedprox | local | centralized
    proximal_mu: float = 0.0
    num_rounds: int = 10
    fraction_train: float = 1.0
    min_train_nodes: int = 2
    eval_every: int = 1
    round_timeout_s: float = 3600.0
    aggregation: str = "fedavg"  # fedavg (A, B averaged apart) | ffa (A frozen, B only) | svd (exact)
    server_optimizer: str = "none"  # none | fedadam | fedyogi | fedavgm (on the aggregated update)
    server_lr: float = 1.0  # FedAdam/FedYogi eta; FedAvgM server learning rate
    server_momentum: float = 0.9  # FedAvgM momentum; FedAdam/FedYogi beta_1
    server_beta2: float = 0.99  # FedAdam/FedYogi second moment
    server_tau: float = 1e-3  # FedAdam/FedYogi adaptivity
    wire_dtype: str = "float32"  # float32 | float16 for adapter tensors in both directions
    max_update_norm: float = 0.0  # replies changing the adapter by more (L2) are rejected; 0 = no bound
    robust: str = "none"  # none | trimmed_mean | median: coordinate-wise, unweighted, instead of the mean
    trim_fraction: float = 0.25  # trimmed_mean: share of clients cut at each end of every coordinate


@dataclass(frozen=True)
class SimulationConfig:
    """Flower Simulation Engine resources."""

    num_supernodes: int = 4
    num_cpus: float = 1.0  # per client
    num_gpus: float = 0.0  # per client


@dataclass(frozen=True)
class PrivacyConfig:
    """User-level differential privacy (DP-FedAvg) and its budget."""

    user_level: bool = False  # clip each client's update to clip_norm, add server noise
    clip_norm: float = 1.0  # C: L2 bound on one client's adapter update
    noise_multiplier: float = 1.0  # z: server noise std is z * C / m (m = clients sampled)
    delta: float = 1e-5
    target_epsilon: float = 0.0  # user-level budget; 0 = no budget (rounds are still accounted)
    client_sampling: str = "fixed"  # fixed (Flower's fixed-size sample) | poisson (each client w.p. q)
    client_sampling_rate: float = 1.0  # q for poisson sampling
    noise_seed: int = -1  # >= 0 makes the noise predictable: tests only, NO privacy
    record_level: bool = False  # DP-SGD (Opacus) inside every client
    dp_sgd_noise_multiplier: float = 1.0  # sigma, unless dp_sgd_target_epsilon calibrates it
    dp_sgd_clip_norm: float = 1.0  # per-example gradient L2 bound
    dp_sgd_target_epsilon: float = 0.0  # > 0: calibrate sigma so a client ends the planned run here
    client_max_epsilon: float = 0.0  # > 0: a client declines a round that would push it past this
    client_state_dir: str = ""  # simulation: where clients keep their DP-SGD spend (set by fedft)
    canaries: int = 0  # empirical audit (simulation only): random secrets, each inserted w.p. 1/2
    canary_client: int = 0  # the simulated client (partition id) whose data gets the canaries
    canary_repeats: int = 1  # copies of each inserted canary

    @property
    def poisson_clients(self) -> bool:
        """DP-FedAvg with Poisson client sampling (a round may be small, or empty)."""
        return self.user_level and self.client_sampling == "poisson"


@dataclass(frozen=True)
class DpoConfig:
    """The centralized DPO stage run on the federated adapter after the last round.

    The policy starts from the federated SFT adapter; the reference is that adapter,
    frozen. Preference files are JSONL rows {"prompt", "chosen", "rejected", "task"}; with
    ``rejected_from = "model"`` each rejected answer is replaced by the federated model's
    own most probable wrong answer (``fedft.align.pairs``) before training and scoring.
    """

    enabled: bool = False
    train_path: str = ""  # preference pairs to train on
    eval_path: str = ""  # held-out pairs: preference accuracy before and after DPO
    beta: float = 0.1  # strength of the pull towards the reference (higher: stay closer)
    steps: int = 80  # optimizer steps (the demo: ~1 min on 2 CPU cores)
    batch_size: int = 16  # pairs per step
    learning_rate: float = 1e-3
    lr_schedule: str = "cosine"  # constant | linear | cosine
    warmup_steps: int = 0
    max_grad_norm: float = 1.0  # 0 disables clipping
    sft_weight: float = 3.0  # adds this times the chosen answers' mean token NLL (RPO); 0 = pure DPO
    rejected_from: str = "file"  # file | model: the federated model's own most probable wrong answers
    samples: int = 8  # with rejected_from = "model": answers sampled per prompt (besides the greedy one)
    temperature: float = 1.0  # ... at this temperature
    negatives_per_prompt: int = 1  # ... training pairs per prompt (held-out pairs always use 1)
    max_length: int = 128  # tokens of prompt + answer
    eval_max_pairs: int = 200  # held-out pairs scored (drawn evenly when there are more)
    log_every: int = 10  # progress line every N steps
    seed: int = 0


@dataclass(frozen=True)
class ReportConfig:
    """What the end of a run scores and writes (RUN_DIR/evaluation.json, report.md/json, plots)."""

    evaluate_stages: bool = True  # score base, federated (and DPO) models on the held-out data
    general_text: str = ""  # text the base knew, for the forgetting probe (.txt lines or .jsonl "text");
    # empty: the demo's own probe for the demo base, none otherwise
    samples: int = 5  # generated answers shown per stage


@dataclass(frozen=True)
class FedftConfig:
    """The whole run."""

    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    dpo: DpoConfig = field(default_factory=DpoConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    @property
    def model_path(self) -> str:
        """The path or hub id actually handed to ``from_pretrained``."""
        return str(demo_model_dir()) if self.model.path == DEMO_MODEL else self.model.path


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "lora": LoraConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "strategy": StrategyConfig,
    "simulation": SimulationConfig,
    "privacy": PrivacyConfig,
    "dpo": DpoConfig,
    "report": ReportConfig,
}
CHOICES: dict[str, tuple[str, ...]] = {
    "model.quantization": ("nf4", "int8", "none"),
    "model.compute_dtype": ("float32", "bfloat16", "float16"),
    "data.partition": ("iid", "dirichlet", "natural"),
    "train.lr_schedule": ("constant", "linear", "cosine"),
    "strategy.name": ("fedavg", "fedprox", "local", "centralized"),
    "strategy.aggregation": ("fedavg", "ffa", "svd"),
    "strategy.server_optimizer": ("none", "fedadam", "fedyogi", "fedavgm"),
    "strategy.wire_dtype": ("float32", "float16"),
    "strategy.robust": ("none", "trimmed_mean", "median"),
    "privacy.client_sampling": ("fixed", "poisson"),
    "dpo.lr_schedule": ("constant", "linear", "cosine"),
    "dpo.rejected_from": ("file", "model"),
}
# (field, predicate, what is allowed)
RANGES: list[tuple[str, Any, str]] = [
    ("lora.r", lambda v: v >= 1, "an integer >= 1"),
    ("lora.alpha", lambda v: v > 0, "a number > 0"),
    ("lora.dropout", lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
    ("lora.target_modules", lambda v: len(v) >= 1, "a non-empty list of module names or 'all-linear'"),
    ("lora.client_ranks", lambda v: all(r >= 1 for r in v), "a list of integers >= 1"),
    ("strategy.server_lr", lambda v: v > 0, "a number > 0"),
    ("strategy.server_momentum", lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
    ("strategy.server_beta2", lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
    ("strategy.server_tau", lambda v: v > 0, "a number > 0"),
    ("strategy.max_update_norm", lambda v: v >= 0, "a number >= 0 (0: no bound)"),
    ("strategy.trim_fraction", lambda v: 0.0 <= v < 0.5, "a number in [0, 0.5)"),
    ("privacy.clip_norm", lambda v: v > 0, "a number > 0"),
    ("privacy.noise_multiplier", lambda v: v >= 0, "a number >= 0"),
    ("privacy.delta", lambda v: 0.0 < v < 1.0, "a number in (0, 1)"),
    ("privacy.target_epsilon", lambda v: v >= 0, "a number >= 0 (0: no budget)"),
    ("privacy.dp_sgd_noise_multiplier", lambda v: v > 0, "a number > 0"),
    ("privacy.dp_sgd_clip_norm", lambda v: v > 0, "a number > 0"),
    ("privacy.dp_sgd_target_epsilon", lambda v: v >= 0, "a number >= 0 (0: use dp_sgd_noise_multiplier)"),
    ("privacy.client_max_epsilon", lambda v: v >= 0, "a number >= 0 (0: no per-client limit)"),
    ("privacy.canaries", lambda v: v >= 0, "an integer >= 0 (0: no canaries)"),
    ("privacy.client_sampling_rate", lambda v: 0.0 < v <= 1.0, "a number in (0, 1]"),
    ("privacy.canary_repeats", lambda v: v >= 1, "an integer >= 1"),
    ("data.dirichlet_alpha", lambda v: v > 0, "a number > 0"),
    ("data.max_length", lambda v: v >= 8, "an integer >= 8"),
    ("data.eval_max_examples", lambda v: v >= 1, "an integer >= 1"),
    ("train.local_steps", lambda v: v >= 1, "an integer >= 1"),
    ("train.batch_size", lambda v: v >= 1, "an integer >= 1"),
    ("train.grad_accum", lambda v: v >= 1, "an integer >= 1"),
    ("train.learning_rate", lambda v: v > 0, "a number > 0"),
    ("train.warmup_steps", lambda v: v >= 0, "an integer >= 0"),
    ("train.weight_decay", lambda v: v >= 0, "a number >= 0"),
    ("train.max_grad_norm", lambda v: v >= 0, "a number >= 0 (0 disables clipping)"),
    ("train.num_threads", lambda v: v >= 0, "an integer >= 0"),
    ("strategy.proximal_mu", lambda v: v >= 0, "a number >= 0"),
    ("strategy.num_rounds", lambda v: v >= 1, "an integer >= 1"),
    ("strategy.fraction_train", lambda v: 0.0 < v <= 1.0, "a number in (0, 1]"),
    ("strategy.min_train_nodes", lambda v: v >= 1, "an integer >= 1"),
    ("strategy.eval_every", lambda v: v >= 0, "an integer >= 0 (0 evaluates only the last round)"),
    ("strategy.round_timeout_s", lambda v: v > 0, "a number > 0"),
    ("simulation.num_supernodes", lambda v: v >= 1, "an integer >= 1"),
    ("simulation.num_cpus", lambda v: v > 0, "a number > 0"),
    ("simulation.num_gpus", lambda v: v >= 0, "a number >= 0"),
    ("dpo.beta", lambda v: v > 0, "a number > 0"),
    ("dpo.steps", lambda v: v >= 1, "an integer >= 1"),
    ("dpo.batch_size", lambda v: v >= 1, "an integer >= 1"),
    ("dpo.learning_rate", lambda v: v > 0, "a number > 0"),
    ("dpo.warmup_steps", lambda v: v >= 0, "an integer >= 0"),
    ("dpo.max_grad_norm", lambda v: v >= 0, "a number >= 0 (0 disables clipping)"),
    ("dpo.sft_weight", lambda v: v >= 0, "a number >= 0 (0: pure DPO)"),
    ("dpo.max_length", lambda v: v >= 8, "an integer >= 8"),
    ("dpo.samples", lambda v: v >= 1, "an integer >= 1"),
    ("dpo.temperature", lambda v: v > 0, "a number > 0"),
    ("dpo.negatives_per_prompt", lambda v: v >= 1, "an integer >= 1"),
    ("dpo.eval_max_pairs", lambda v: v >= 1, "an integer >= 1"),
    ("dpo.log_every", lambda v: v >= 1, "an integer >= 1"),
    ("report.samples", lambda v: v >= 0, "an integer >= 0"),
]
PATH_FIELDS = ("data.train_files", "data.eval_file", "dpo.train_path", "dpo.eval_path", "report.general_text")


def _where(source: str | None, lines: list[str], section: str | None, key: str) -> str:
    """'file:line' of ``key`` inside ``[section]`` when it can be found, else the file."""
    if not source:
        return "config"
    current = None
    for number, line in enumerate(lines, start=1):
        header = re.match(r"\s*\[([^\]]+)\]", line)
        if header:
            current = header.group(1).strip()
        elif current == section and re.match(rf"\s*{re.escape(key)}\s*=", line):
            return f"{source}:{number}"
    return source


def _coerce(value: Any, annotation: str, name: str, where: str) -> Any:
    """Check a raw TOML value against a dataclass field's type; ints widen to floats."""
    ok: bool
    if annotation == "bool":
        ok = isinstance(value, bool)
    elif annotation == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif annotation == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif annotation == "str":
        ok = isinstance(value, str)
    elif annotation.startswith("tuple[int"):
        ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        value = tuple(value) if ok else value
    elif annotation.startswith("tuple[str"):
        if isinstance(value, str):
            value = [value]
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        value = tuple(value) if ok else value
    else:  # pragma: no cover - every field type is listed above
        raise TypeError(f"unsupported field type {annotation}")
    if not ok:
        raise ConfigError(f"{where}: {name} = {value!r} has the wrong type: expected {annotation}")
    return value


def _build_section(cls: type, raw: dict, section: str, source: str | None, lines: list[str]):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in raw.items():
        where = _where(source, lines, section, key)
        if key not in fields:
            raise ConfigError(
                f"{where}: unknown field {section}.{key}; allowed: {', '.join(sorted(fields))}"
            )
        values[key] = _coerce(value, str(fields[key].type), f"{section}.{key}", where)
    return cls(**values)


def _validate(cfg: FedftConfig, source: str | None, lines: list[str]) -> None:
    def get(name: str) -> Any:
        section, key = name.split(".")
        return getattr(getattr(cfg, section), key)

    def fail(name: str, allowed: str) -> None:
        section, key = name.split(".")
        where = _where(source, lines, section, key)
        raise ConfigError(f"{where}: {name} = {get(name)!r} is not allowed; expected {allowed}")

    for name, choices in CHOICES.items():
        if get(name) not in choices:
            fail(name, "one of " + ", ".join(repr(c) for c in choices))
    for name, predicate, allowed in RANGES:
        if not predicate(get(name)):
            fail(name, allowed)
    if not cfg.data.eval_file:
        fail("data.eval_file", "a held-out JSONL file")
    device = cfg.model.device
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        fail("model.device", "'auto', 'cpu', 'cuda' or 'cuda:N'")
    if cfg.strategy.min_train_nodes > cfg.simulation.num_supernodes and cfg.strategy.name in (
        "fedavg", "fedprox"
    ):
        fail("strategy.min_train_nodes", f"at most simulation.num_supernodes = {cfg.simulation.num_supernodes}")
    ranks = cfg.lora.client_ranks
    if ranks and len(ranks) != cfg.simulation.num_supernodes:
        fail("lora.client_ranks", f"one rank per simulated client ({cfg.simulation.num_supernodes}), or []")
    if any(r > cfg.lora.r for r in ranks):
        fail("lora.client_ranks", f"ranks at most lora.r = {cfg.lora.r} (the global adapter's rank)")
    if cfg.strategy.aggregation == "ffa" and any(r != cfg.lora.r for r in ranks):
        fail("lora.client_ranks", "equal ranks with strategy.aggregation = 'ffa' (every client "
             "shares one frozen A); use 'svd' or 'fedavg' for heterogeneous ranks")
    if cfg.privacy.client_sampling == "poisson" and not cfg.privacy.user_level:
        fail("privacy.client_sampling", "'fixed' unless privacy.user_level is on (Poisson sampling of "
             "clients exists for the user-level accounting)")
    if cfg.strategy.robust != "none":
        if cfg.strategy.aggregation == "svd":
            fail("strategy.robust", "'none' with strategy.aggregation = 'svd' (robust statistics apply "
                 "coordinate-wise to the tensors sent; the SVD re-factors their products)")
        if cfg.privacy.user_level:
            fail("strategy.robust", "'none' with privacy.user_level (DP-FedAvg's noise is calibrated to the "
                 "mean of the clipped updates)")
        if ranks:
            fail("strategy.robust", "'none' with lora.client_ranks (zero-padded smaller ranks would "
                 "look like outliers)")
    if cfg.privacy.user_level:
        if cfg.strategy.aggregation == "svd":
            fail("strategy.aggregation", "'fedavg' or 'ffa' with privacy.user_level (noise is added to "
                 "the mean of the clipped updates; the SVD's re-factoring has no sensitivity bound)")
        if ranks:
            fail("lora.client_ranks", "[] with privacy.user_level (every update must have the same shape)")
        if cfg.strategy.wire_dtype != "float32":
            fail("strategy.wire_dtype", "'float32' with privacy.user_level (rounding to float16 after "
                 "clipping could push an update above clip_norm)")
    if cfg.privacy.canaries and not 0 <= cfg.privacy.canary_client < cfg.simulation.num_supernodes:
        fail("privacy.canary_client", f"a simulated client's partition id, 0..{cfg.simulation.num_supernodes - 1}")
    if cfg.privacy.record_level:
        if cfg.train.grad_accum != 1:
            fail("train.grad_accum", "1 with privacy.record_level (Poisson-sampled batches are the DP-SGD steps)")
        if cfg.strategy.name == "fedprox":
            fail("strategy.name", "'fedavg' with privacy.record_level (the proximal term is not per-example)")
    if cfg.strategy.server_optimizer != "none" and cfg.strategy.name == "fedprox":
        fail("strategy.server_optimizer", "'none' with strategy.name = 'fedprox' (use fedavg with a server optimizer)")
    if cfg.strategy.server_optimizer != "none" and cfg.strategy.aggregation == "svd":
        fail("strategy.server_optimizer", "'none' with strategy.aggregation = 'svd': the SVD re-factors "
             "A and B every round, so their round-to-round difference is no pseudo-gradient")
    if cfg.dpo.enabled:
        for name in ("dpo.train_path", "dpo.eval_path"):
            if not get(name):
                fail(name, "a preference JSONL file (rows with prompt, chosen, rejected) when dpo.enabled")
        if cfg.dpo.warmup_steps >= cfg.dpo.steps:
            fail("dpo.warmup_steps", f"fewer than dpo.steps = {cfg.dpo.steps}")


def config_from_dict(raw: dict, *, source: str | None = None, text: str = "") -> FedftConfig:
    """Build and validate a config from a nested dict (parsed TOML or the wire form)."""
    lines = text.splitlines()
    raw = dict(raw)
    sections = {}
    for name, cls in SECTIONS.items():
        part = raw.pop(name, {})
        if not isinstance(part, dict):
            raise ConfigError(f"{source or 'config'}: [{name}] must be a table, got {part!r}")
        sections[name] = _build_section(cls, part, name, source, lines)
    seed = raw.pop("seed", 0)
    if raw:
        unknown = ", ".join(sorted(raw))
        raise ConfigError(
            f"{source or 'config'}: unknown top-level key(s) {unknown}; allowed: seed, "
            + ", ".join(f"[{s}]" for s in SECTIONS)
        )
    seed = _coerce(seed, "int", "seed", _where(source, lines, None, "seed"))
    cfg = FedftConfig(seed=seed, **sections)
    _validate(cfg, source, lines)
    return cfg


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``section.key=value``; the value is read as TOML, else taken as a plain string."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    dotted, text = item.split("=", 1)
    keys = dotted.strip().split(".")
    if not all(keys):
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    return keys, value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Return a copy of ``raw`` with each ``section.key=value`` applied."""
    merged = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for item in overrides:
        keys, value = parse_override(item)
        if len(keys) == 1:
            merged[keys[0]] = value
        elif len(keys) == 2:
            if keys[0] not in SECTIONS:
                raise ConfigError(
                    f"--set {item!r}: unknown section {keys[0]!r}; allowed: {', '.join(SECTIONS)}"
                )
            merged.setdefault(keys[0], {})[keys[1]] = value
        else:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
    return merged


def _resolve_paths(raw: dict, base: Path) -> dict:
    """Every field of ``PATH_FIELDS`` made absolute against ``base`` (a lone train file becomes a list)."""
    def resolve(value: Any) -> Any:
        if isinstance(value, list):
            return [resolve(v) for v in value]
        return str((base / value).resolve()) if isinstance(value, str) and value else value

    raw = dict(raw)
    for name in PATH_FIELDS:
        section, key = name.split(".")
        part = raw.get(section)
        if not isinstance(part, dict) or key not in part:
            continue
        value = part[key]
        if name == "data.train_files" and isinstance(value, str):
            value = [value]
        raw[section] = {**part, key: resolve(value)}
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> FedftConfig:
    """Load a TOML config file, apply ``--set`` overrides, resolve paths, validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from err
    # Paths in the file are relative to the file; paths given with --set to the shell's cwd.
    raw = _resolve_paths(raw, path.parent)
    given = _resolve_paths(apply_overrides({}, overrides or []), Path.cwd())
    for section, value in given.items():
        if isinstance(value, dict) and isinstance(raw.get(section), dict):
            raw[section] = {**raw[section], **value}
        else:
            raw[section] = value
    return config_from_dict(raw, source=str(path), text=text)


def config_to_dict(cfg: FedftConfig) -> dict:
    """A plain, JSON-serialisable dict (tuples become lists) that round-trips."""
    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return list(value)
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(cfg))
