"""The sections of a fedft config: typed, frozen dataclasses with each field's limits beside it.

One ``FedftConfig`` drives simulation, baselines and deployment alike. Rules that tie fields
of one section together are that section's ``problems()``; rules across sections are
``FedftConfig.problems()``. Pure: no I/O beyond locating the embedded demo model.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from fedft.config.fields import (
    ConfigError,
    FrozenTable,
    _learning_rate,
    _lr_schedule,
    _max_grad_norm,
    _Section,
    _warmup_steps,
    option,
)

DEMO_MODEL = "demo"
DEMO_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "demo-base"
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


@dataclass(frozen=True)
class ModelConfig(_Section):
    """Which base model to load and how."""

    path: str = DEMO_MODEL  # "demo" (the embedded tiny Llama), a local directory, or a hub id
    quantization: str = option("nf4", choices=("nf4", "int8", "none"))
    compute_dtype: str = option("float32", choices=("float32", "bfloat16", "float16"))
    double_quant: bool = True
    device: str = option("auto", "'auto', 'cpu', 'cuda' or 'cuda:N'",
                         check=lambda v: re.fullmatch(r"auto|cpu|cuda(:\d+)?", v))
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    # train even when bitsandbytes left weight layers of the base in full precision (their types are
    # named when loading refuses; summary.json records the effective quantization either way)
    allow_unquantized: bool = False


@dataclass(frozen=True)
class LoraConfig(_Section):
    """The LoRA adapter every client trains."""

    r: int = option(16, "an integer >= 1")  # the global adapter's rank (the largest any client may train)
    alpha: float = option(32.0, "a number > 0")  # scaling alpha / r; a client of lower rank scales alpha with its rank
    dropout: float = option(0.0, "a number in [0, 1)")
    target_modules: tuple[str, ...] = option(("all-linear",), "a non-empty list of module names or 'all-linear'",
                                             check=bool)
    # simulation: rank per partition id (empty: all r)
    client_ranks: tuple[int, ...] = option((), "a list of integers >= 1", check=lambda v: all(r >= 1 for r in v))

    def problems(self) -> Iterator[tuple[str, str]]:
        if any(r > self.r for r in self.client_ranks):
            yield "client_ranks", f"ranks at most lora.r = {self.r} (the global adapter's rank)"


# A row's fields, under the names data.columns may give them in an institution's files.
ROW_FIELDS = ("instruction", "input", "output", "messages")


@dataclass(frozen=True)
class DataConfig(_Section):
    """Where the training and held-out data live, what their columns are called, and how simulated
    institutions split them."""

    # data files: .jsonl, .json (a list of objects, or one object per line), .csv, .parquet, or a folder
    # written by datasets' save_to_disk
    train_files: tuple[str, ...] = ()
    eval_file: str = option("", "a held-out data file", check=bool)  # in any of the formats above
    # row field -> the column holding it in your files, e.g. {instruction = "question", output = "answer"}; the
    # fields are instruction, input, output, messages; for every data file (one in these names reads as it is)
    columns: dict[str, str] = field(default_factory=FrozenTable)
    partition: str = option("natural", choices=("iid", "dirichlet", "natural"))
    partition_by: str = "institution"  # column for natural, label column for dirichlet
    dirichlet_alpha: float = option(0.5, "a number > 0")
    task_column: str = "task"  # held-out rows are scored per value of this column, if present
    max_length: int = option(256, "an integer >= 8")
    # a prompt of max_length tokens or more: refuse the data (naming every such row), or keep its last
    # max_length / 2 tokens
    long_prompts: str = option("refuse", choices=("refuse", "truncate"))
    empty_answers: str = option("refuse", choices=("refuse", "skip"))  # a row whose answer is blank
    eval_max_examples: int = option(200, "an integer >= 1")
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.columns, FrozenTable):  # a plain dict would make the section unhashable
            object.__setattr__(self, "columns", FrozenTable(self.columns))

    def problems(self) -> Iterator[tuple[str, str]]:
        unknown = [key for key in self.columns if key not in ROW_FIELDS]
        if unknown:
            yield "columns", (f"a table from row fields ({', '.join(ROW_FIELDS)}) to your files' column names, "
                              'e.g. {instruction = "question", output = "answer"}; not a row field: '
                              + ", ".join(map(repr, unknown)))
        if not all(self.columns.values()):
            yield "columns", "a table whose values are column names (non-empty strings)"


@dataclass(frozen=True)
class TrainConfig(_Section):
    """The local training loop run by each client every round."""

    local_steps: int = option(20, "an integer >= 1")
    batch_size: int = option(16, "an integer >= 1")
    grad_accum: int = option(1, "an integer >= 1")
    learning_rate: float = _learning_rate()
    lr_schedule: str = _lr_schedule()  # constant | linear | cosine, across all rounds
    warmup_steps: int = _warmup_steps()
    weight_decay: float = option(0.0, "a number >= 0")
    max_grad_norm: float = _max_grad_norm()
    num_threads: int = option(0, "an integer >= 0")  # torch threads per client process; 0 keeps torch's default
    # each client's AdamW moments carried to its next round (kept at the institution), not restarted
    keep_optimizer_state: bool = False


@dataclass(frozen=True)
class StrategyConfig(_Section):
    """How the server combines clients (or which baseline replaces federation)."""

    # scaffold: FedAvg plus control variates against client drift (fedft.federated.scaffold)
    name: str = option("fedavg", choices=("fedavg", "fedprox", "scaffold", "local", "centralized"))
    proximal_mu: float = option(0.0, "a number >= 0")
    num_rounds: int = option(10, "an integer >= 1")
    fraction_train: float = option(1.0, "a number in (0, 1]")
    min_train_nodes: int = option(2, "an integer >= 1")
    eval_every: int = option(1, "an integer >= 0 (0 evaluates only the last round)")
    round_timeout_s: float = option(3600.0, "a number > 0")
    # fedavg (A, B averaged apart) | ffa (A frozen, B only) | svd (exact)
    aggregation: str = option("fedavg", choices=("fedavg", "ffa", "svd"))
    # applied to the aggregated update
    server_optimizer: str = option("none", choices=("none", "fedadam", "fedyogi", "fedavgm"))
    server_lr: float = option(1.0, "a number > 0")  # FedAdam/FedYogi eta; FedAvgM, SCAFFOLD server learning rate
    server_momentum: float = option(0.9, "a number in [0, 1)")  # FedAvgM momentum; FedAdam/FedYogi beta_1
    server_beta2: float = option(0.99, "a number in [0, 1)")  # FedAdam/FedYogi second moment
    server_tau: float = option(1e-3, "a number > 0")  # FedAdam/FedYogi adaptivity
    wire_dtype: str = option("float32", choices=("float32", "float16"))  # for adapter tensors in both directions
    # replies changing the adapter by more (L2) are rejected
    max_update_norm: float = option(0.0, "a number >= 0 (0: no bound)")
    # coordinate-wise, unweighted, instead of the mean
    robust: str = option("none", choices=("none", "trimmed_mean", "median"))
    # trimmed_mean: share of clients cut at each end of every coordinate
    trim_fraction: float = option(0.25, "a number in [0, 0.5)")

    def problems(self) -> Iterator[tuple[str, str]]:
        if self.robust != "none" and self.aggregation == "svd":
            yield "robust", ("'none' with strategy.aggregation = 'svd' (robust statistics apply coordinate-wise "
                             "to the tensors sent; the SVD re-factors their products)")
        if self.server_optimizer != "none" and self.name == "fedprox":
            yield "server_optimizer", "'none' with strategy.name = 'fedprox' (use fedavg with a server optimizer)"
        if self.name == "scaffold":
            if self.server_optimizer != "none":
                yield "server_optimizer", ("'none' with strategy.name = 'scaffold' "
                                           "(it has its own server step, server_lr)")
            if self.aggregation != "fedavg" or self.robust != "none":
                key = "aggregation" if self.aggregation != "fedavg" else "robust"
                yield key, ("the default with strategy.name = 'scaffold' (its control variates live in the space of "
                            "the averaged A and B tensors)")
        if self.server_optimizer != "none" and self.aggregation == "svd":
            yield "server_optimizer", ("'none' with strategy.aggregation = 'svd': the SVD re-factors A and B every "
                                       "round, so their round-to-round difference is no pseudo-gradient")


@dataclass(frozen=True)
class SimulationConfig(_Section):
    """Flower Simulation Engine resources."""

    num_supernodes: int = option(4, "an integer >= 1")
    num_cpus: float = option(1.0, "a number > 0")  # per client
    num_gpus: float = option(0.0, "a number >= 0")  # per client


@dataclass(frozen=True)
class PrivacyConfig(_Section):
    """User-level differential privacy (DP-FedAvg) and its budget."""

    user_level: bool = False  # clip each client's update to clip_norm, add server noise
    clip_norm: float = option(1.0, "a number > 0")  # C: L2 bound on one client's adapter update
    noise_multiplier: float = option(1.0, "a number >= 0")  # z: server noise std is z * C / m (m = clients sampled)
    delta: float = option(1e-5, "a number in (0, 1)")
    # user-level budget; 0 = no budget (rounds are still accounted)
    target_epsilon: float = option(0.0, "a number >= 0 (0: no budget)")
    # fixed (Flower's fixed-size sample) | poisson (each client w.p. q)
    client_sampling: str = option("fixed", choices=("fixed", "poisson"))
    client_sampling_rate: float = option(1.0, "a number in (0, 1]")  # q for poisson sampling
    noise_seed: int = -1  # >= 0 makes the noise predictable: tests only, NO privacy
    record_level: bool = False  # DP-SGD (Opacus) inside every client
    dp_sgd_noise_multiplier: float = option(1.0, "a number > 0")  # sigma, unless dp_sgd_target_epsilon calibrates it
    dp_sgd_clip_norm: float = option(1.0, "a number > 0")  # per-example gradient L2 bound
    # > 0: calibrate sigma so a client ends the planned run here
    dp_sgd_target_epsilon: float = option(0.0, "a number >= 0 (0: use dp_sgd_noise_multiplier)")
    # > 0: a client declines a round that would push it past this
    client_max_epsilon: float = option(0.0, "a number >= 0 (0: no per-client limit)")
    client_state_dir: str = ""  # simulation: where clients keep their DP-SGD spend (set by fedft)
    # empirical audit (simulation only): random secrets, each inserted w.p. 1/2
    canaries: int = option(0, "an integer >= 0 (0: no canaries)")
    canary_client: int = 0  # the simulated client (partition id) whose data gets the canaries
    canary_repeats: int = option(1, "an integer >= 1")  # copies of each inserted canary

    @property
    def poisson_clients(self) -> bool:
        """DP-FedAvg with Poisson client sampling (a round may be small, or empty)."""
        return self.user_level and self.client_sampling == "poisson"

    def problems(self) -> Iterator[tuple[str, str]]:
        if self.client_sampling == "poisson" and not self.user_level:
            yield "client_sampling", ("'fixed' unless privacy.user_level is on (Poisson sampling of clients exists "
                                      "for the user-level accounting)")


@dataclass(frozen=True)
class DpoConfig(_Section):
    """The centralized DPO stage run on the federated adapter after the last round.

    The policy starts from the federated SFT adapter; the reference is that adapter,
    frozen. Preference files are JSONL rows {"prompt", "chosen", "rejected", "task"}; with
    ``rejected_from = "model"`` each rejected answer is replaced by the federated model's
    own most probable wrong answer (``fedft.align.pairs``) before training and scoring.
    """

    enabled: bool = False
    train_path: str = ""  # preference pairs to train on
    eval_path: str = ""  # held-out pairs: preference accuracy before and after DPO
    beta: float = option(0.1, "a number > 0")  # strength of the pull towards the reference (higher: stay closer)
    steps: int = option(80, "an integer >= 1")  # optimizer steps (the demo: ~1 min on 2 CPU cores)
    batch_size: int = option(16, "an integer >= 1")  # pairs per step
    learning_rate: float = _learning_rate()
    lr_schedule: str = _lr_schedule()  # constant | linear | cosine
    warmup_steps: int = _warmup_steps()
    max_grad_norm: float = _max_grad_norm()  # 0 disables clipping
    # adds this times the chosen answers' mean token NLL (RPO)
    sft_weight: float = option(3.0, "a number >= 0 (0: pure DPO)")
    # file | model (the federated model's own most probable wrong answers)
    rejected_from: str = option("file", choices=("file", "model"))
    # with rejected_from = "model": answers sampled per prompt (besides the greedy one)
    samples: int = option(8, "an integer >= 1")
    temperature: float = option(1.0, "a number > 0")  # ... at this temperature
    # prompts per generate() call while building pairs (and wrong answers per scoring batch): larger is
    # faster on a CPU (measured 1.8x at 128 vs 32 on the demo) and needs more memory on a GPU
    generation_batch_size: int = option(32, "an integer >= 1")
    # ... training pairs per prompt (held-out pairs always use 1)
    negatives_per_prompt: int = option(1, "an integer >= 1")
    max_length: int = option(128, "an integer >= 8")  # tokens of prompt + answer
    eval_max_pairs: int = option(200, "an integer >= 1")  # held-out pairs scored (drawn evenly when there are more)
    # training prompts used (drawn evenly when there are more): bounds the pair-building work; 0 = all
    train_max_pairs: int = option(0, "an integer >= 0 (0: all)")
    log_every: int = option(10, "an integer >= 1")  # progress line every N steps
    seed: int = 0

    def problems(self) -> Iterator[tuple[str, str]]:
        if self.enabled:
            for key in ("train_path", "eval_path"):
                if not getattr(self, key):
                    yield key, "a preference JSONL file (rows with prompt, chosen, rejected) when dpo.enabled"
            if self.warmup_steps >= self.steps:
                yield "warmup_steps", f"fewer than dpo.steps = {self.steps}"


@dataclass(frozen=True)
class ReportConfig(_Section):
    """What the end of a run scores and writes (RUN_DIR/evaluation.json, report.md/json, plots)."""

    evaluate_stages: bool = True  # score base, federated (and DPO) models on the held-out data
    general_text: str = ""  # text the base knew, for the forgetting probe (.txt lines or .jsonl "text");
    # empty: no forgetting probe (the demo configs name simulations/data/demo/general.jsonl)
    samples: int = option(5, "an integer >= 0")  # generated answers shown per stage


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

    def problems(self) -> Iterator[tuple[str, str]]:
        """("section.field", what is allowed) for each broken rule that ties sections together."""
        lora, strategy, privacy = self.lora, self.strategy, self.privacy
        clients, ranks = self.simulation.num_supernodes, lora.client_ranks
        if strategy.name == "scaffold":
            if ranks:
                yield "lora.client_ranks", "[] with strategy.name = 'scaffold' (control variates need one shape)"
            if privacy.user_level or privacy.record_level:
                key = "privacy.user_level" if privacy.user_level else "privacy.record_level"
                yield key, "false with strategy.name = 'scaffold' (not implemented with differential privacy)"
        if strategy.name in ("local", "centralized") and (privacy.user_level or privacy.record_level):
            key = "privacy.user_level" if privacy.user_level else "privacy.record_level"
            yield key, (f"false with strategy.name = '{strategy.name}' "
                        "(the baselines train without differential privacy)")
        if strategy.min_train_nodes > clients and strategy.name in ("fedavg", "fedprox", "scaffold"):
            yield "strategy.min_train_nodes", f"at most simulation.num_supernodes = {clients}"
        if ranks and len(ranks) != clients:
            yield "lora.client_ranks", f"one rank per simulated client ({clients}), or []"
        if strategy.aggregation == "ffa" and any(r != lora.r for r in ranks):
            yield "lora.client_ranks", ("equal ranks with strategy.aggregation = 'ffa' (every client shares one "
                                        "frozen A); use 'svd' or 'fedavg' for heterogeneous ranks")
        if strategy.robust != "none" and privacy.user_level:
            yield "strategy.robust", ("'none' with privacy.user_level (DP-FedAvg's noise is calibrated to the mean "
                                      "of the clipped updates)")
        if strategy.robust != "none" and ranks:
            yield "strategy.robust", ("'none' with lora.client_ranks (zero-padded smaller ranks would look like "
                                      "outliers)")
        if privacy.user_level:
            if strategy.aggregation == "svd":
                yield "strategy.aggregation", ("'fedavg' or 'ffa' with privacy.user_level (noise is added to the "
                                               "mean of the clipped updates; the SVD's re-factoring has no sensitivity "
                                               "bound)")
            if ranks:
                yield "lora.client_ranks", "[] with privacy.user_level (every update must have the same shape)"
            if strategy.wire_dtype != "float32":
                yield "strategy.wire_dtype", ("'float32' with privacy.user_level (rounding to float16 after clipping "
                                              "could push an update above clip_norm)")
        if privacy.canaries and not 0 <= privacy.canary_client < clients:
            yield "privacy.canary_client", f"a simulated client's partition id, 0..{clients - 1}"
        if privacy.record_level:
            if self.train.grad_accum != 1:
                yield "train.grad_accum", "1 with privacy.record_level (Poisson-sampled batches are the DP-SGD steps)"
            if strategy.name == "fedprox":
                yield "strategy.name", "'fedavg' with privacy.record_level (the proximal term is not per-example)"


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
PATH_FIELDS = ("data.train_files", "data.eval_file", "dpo.train_path", "dpo.eval_path", "report.general_text")


