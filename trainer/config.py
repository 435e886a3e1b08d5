"""The experiment config: typed, closed (unknown keys are errors), loaded from YAML plus dotted overrides.

Every problem found in a file is collected and raised once as a `ConfigError`, each message naming the
dotted key and the fix; an unknown key suggests the nearest valid one.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from trainer.errors import ConfigError


class _Closed(BaseModel):
    # allow_inf_nan=False: `optim.lr: .inf` would train NaN and exit 0; every float here must be finite.
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=(), allow_inf_nan=False)


# Upper bounds that no real run reaches but that catch a typo'd exponent (`run.max_steps: 1e30`) before it
# allocates or loops forever.
MAX_STEPS = 10**9


class ModelConfig(_Closed):
    """What TerraTorch's `EncoderDecoderFactory.build_model` receives (backbone → necks → decoder → head)."""

    backbone: str = "prithvi_eo_tiny"
    backbone_kwargs: dict[str, Any] = Field(default_factory=dict)
    pretrained_path: str | None = None
    necks: list[dict[str, Any]] = Field(default_factory=list)
    decoder: str = "UNetDecoder"
    decoder_kwargs: dict[str, Any] = Field(default_factory=dict)
    head_kwargs: dict[str, Any] = Field(default_factory=dict)
    freeze_backbone: bool = False

    @model_validator(mode="after")
    def _necks_are_named(self) -> "ModelConfig":
        problems = [f"model.necks[{i}]: {n!r} has no 'name'; write each neck as {{name: <neck>, <kwarg>: ...}}, "
                    "e.g. {name: SelectIndices, indices: [0, 1, 2, 3]}"
                    for i, n in enumerate(self.necks) if not isinstance(n.get("name"), str)]
        if problems:
            raise ValueError("; ".join(problems))
        return self


# TerraTorch's loss names per task (its segmentation and regression tasks' `init_loss`), plus two spellings of
# earlier terrascale releases; trainer.model.tasks hands them to TerraTorch's task.
CLASSIFICATION_LOSSES = ("ce", "dice", "focal", "jaccard", "lovasz")
REGRESSION_LOSSES = ("mse", "rmse", "mae", "huber")
LOSS_ALIASES: dict[str, str | list[str]] = {"ce_dice": ["ce", "dice"], "l1": "mae"}


@dataclass(frozen=True)
class TaskKind:
    """What a native `task.name` means, in one place: `TaskConfig.kind` (the code asks it, not the name).

    Names only (no TerraTorch import here): trainer.model.tasks resolves the classes (`task_class`,
    `terratorch_task_class`), trainer.model.registry the factory; tests/unit/test_task_kind.py checks every
    name against TerraTorch."""

    name: str  # the config value `task.name`, and the `task` field written into exports and GeoTIFF tags
    terratorch_task: str  # TerraTorch's task class (terratorch.tasks) that terrascale's `task_class` extends
    task_class: str  # terrascale's subclass of it (trainer.model.tasks) a native experiment trains
    factory: str  # TerraTorch's model factory (MODEL_FACTORY_REGISTRY) the task builds its model with
    factory_task: str  # the `task` that factory's build_model takes
    head: str  # TerraTorch's head class (terratorch.models.heads) the factory ends the model in
    temporal: bool  # a sample holds several co-registered dates (task.num_dates; trainer.model.temporal)
    output: Literal["classes", "continuous"]  # per pixel: task.num_classes logits, or one continuous value
    postprocess: Literal["softmax", "none"]  # applied to the model's output at predict time
    losses: tuple[str, ...]  # TerraTorch's loss names for its task
    default_loss: str  # TerraTorch's own default `loss` of its task
    primary_metric: str  # the validation metric curves and sweep summaries lead with (as TerraTorch logs it)
    label_dtype: str  # numpy dtype of a label as a dataset yields it; invalid pixels: `label_fill`

    @property
    def classes(self) -> bool:
        return self.output == "classes"

    @property
    def continuous(self) -> bool:
        return self.output == "continuous"

    def out_channels(self, num_classes: int) -> int:
        """Channels of the model's per-pixel output: one logit per class, or the one continuous value."""
        return num_classes if self.classes else 1

    def label_fill(self, ignore_index: int) -> int | float:
        """What an invalid label pixel holds in a sample: task.ignore_index (classes) or NaN (continuous)."""
        return ignore_index if self.classes else float("nan")

    def scores(self, out):
        """The model's output [N, K, H, W] (classes) or [N, H, W] (continuous) as predict blends it, [N, K, H, W]:
        class probabilities (softmax over the class axis), or the value with a channel axis of 1."""
        if self.postprocess == "softmax":
            return out.softmax(dim=1)
        return out[:, None] if out.dim() == 3 else out


SEGMENTATION = TaskKind(
    name="segmentation", terratorch_task="SemanticSegmentationTask", task_class="SegmentationTask",
    factory="EncoderDecoderFactory", factory_task="segmentation", head="SegmentationHead", temporal=False,
    output="classes", postprocess="softmax", losses=CLASSIFICATION_LOSSES, default_loss="ce", primary_metric="mIoU",
    label_dtype="int64")
REGRESSION = TaskKind(
    name="regression", terratorch_task="PixelwiseRegressionTask", task_class="CoherenceRegressionTask",
    factory="EncoderDecoderFactory", factory_task="regression", head="RegressionHead", temporal=False,
    output="continuous", postprocess="none", losses=REGRESSION_LOSSES, default_loss="mse", primary_metric="RMSE",
    label_dtype="float32")
CHANGE_DETECTION = TaskKind(
    name="change_detection", terratorch_task="SemanticSegmentationTask", task_class="ChangeDetectionTask",
    factory="TemporalEncoderDecoderFactory", factory_task="segmentation", head="SegmentationHead", temporal=True,
    output="classes", postprocess="softmax", losses=CLASSIFICATION_LOSSES, default_loss="ce",
    primary_metric="F1_Score", label_dtype="int64")
# every native task, by `task.name` (the order of TaskConfig.name's Literal)
TASK_KINDS: dict[str, TaskKind] = {k.name: k for k in (SEGMENTATION, REGRESSION, CHANGE_DETECTION)}

def loss_names(loss: str | list[str] | dict[str, float]) -> list[str]:
    """The loss names a `task.loss` value names (a name, a list or a {name: weight} dict), aliases resolved."""
    names: list[str] = []
    for name in ([loss] if isinstance(loss, str) else list(loss)):
        alias = LOSS_ALIASES.get(name, name)
        names.extend([alias] if isinstance(alias, str) else alias)
    return names


class TaskConfig(_Closed):
    name: Literal["segmentation", "regression", "change_detection"] = "segmentation"
    num_classes: int = Field(2, ge=1, le=65536)
    # TerraTorch's losses crash on ignore_index=None: keep an integer that never occurs as a class.
    ignore_index: int = -1
    # a TerraTorch loss name, a list of them (summed) or a {name: weight} dict (weighted sum); default: TerraTorch's
    # own per task (TaskKind.default_loss), ce (segmentation, change detection) or mse (regression)
    loss: str | list[str] | dict[str, float] = SEGMENTATION.default_loss

    @model_validator(mode="before")
    @classmethod
    def _default_loss_per_task(cls, data: Any) -> Any:
        # the field's default is the classification tasks' ce; a task with another default gets it here (for an
        # explicit `loss: null` too)
        name = data.get("name") if isinstance(data, dict) else None
        kind = TASK_KINDS.get(name) if isinstance(name, str) else None
        if kind is not None and data.get("loss") is None and kind.default_loss != SEGMENTATION.default_loss:
            data = {**data, "loss": kind.default_loss}
        return data
    class_weights: list[float] | None = None
    # change_detection only (trainer/model/temporal.py); None = the default: diff fusion over 2 dates
    fusion: Literal["diff", "concat", "native"] | None = None
    num_dates: int | None = Field(None, ge=2, le=64)

    @model_validator(mode="after")
    def _weights_match_classes(self) -> "TaskConfig":
        if self.class_weights is not None and len(self.class_weights) != self.num_classes:
            raise ValueError(
                f"task.class_weights has {len(self.class_weights)} entries but task.num_classes is "
                f"{self.num_classes}: give one weight per class"
            )
        return self

    @model_validator(mode="after")
    def _loss_fits_task(self) -> "TaskConfig":
        kind = self.kind
        allowed = kind.losses
        other = {n for k in TASK_KINDS.values() if k.output != kind.output for n in k.losses}
        names = loss_names(self.loss)
        problems = []
        if not names:
            problems.append("task.loss is empty: name one loss, e.g. " + allowed[0])
        for name in names:
            if name not in allowed:
                what = ("a classification loss" if kind.continuous else "a regression loss") if name in other else \
                    "not a TerraTorch loss"
                problems.append(f"task.loss: {name!r} is {what} for task.name={self.name}: use one of "
                                f"{', '.join(allowed)}, a list of them or a {{name: weight}} dict")
        if kind.classes and self.class_weights is not None and "ce" not in names:
            problems.append(f"task.class_weights weigh the cross-entropy term, but task.loss={self.loss!r} has none "
                            "(TerraTorch's dice/focal/jaccard/lovasz take no class weights): add ce or drop the "
                            "weights")
        if "huber" in names and not (isinstance(self.loss, str) and names == ["huber"]):
            problems.append("task.loss: huber alone has terrascale's delta of 0.1; in a list or dict TerraTorch's "
                            "would use torch's 1.0 (half the MSE on [0, 1] targets): use huber alone, or mse/mae")
        if kind.continuous and "rmse" in names:
            problems.append("task.loss: TerraTorch 1.2.11's rmse loss is the fourth root of the MSE (its "
                            "RootLossWrapper is applied twice); use mse (the same minimum) in a native config")
        if "jaccard" in names:
            problems.append("task.loss: TerraTorch's jaccard loss takes no ignore_index, and a native task always "
                            "has one (task.ignore_index): use dice or lovasz")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _classes_need_two(self) -> "TaskConfig":
        # one class makes every pixel right: the loss is 0 from step 1 and nothing is learned
        if self.kind.classes and self.num_classes < 2:
            raise ValueError(f"task.num_classes is {self.num_classes} but {self.name} needs at least 2 classes "
                             "(e.g. 0 background, 1 target); for one continuous target use task.name=regression")
        return self

    @model_validator(mode="after")
    def _dates_only_for_change_detection(self) -> "TaskConfig":
        given = [k for k in ("fusion", "num_dates") if getattr(self, k) is not None]
        if given and not self.kind.temporal:
            raise ValueError(f"{' and '.join('task.' + k for k in given)} only apply to task.name=change_detection "
                             f"(this task is {self.name}): remove them")
        return self

    @property
    def kind(self) -> TaskKind:
        """What this task is (TerraTorch task and factory, output, losses, primary metric): TASK_KINDS[name]."""
        return TASK_KINDS[self.name]

    @property
    def dates(self) -> int:
        """How many co-registered dates one sample holds: 1, or task.num_dates (default 2) for change detection."""
        return (self.num_dates or 2) if self.kind.temporal else 1

    @property
    def date_fusion(self) -> str:
        """How change detection fuses the dates' features: task.fusion, default diff."""
        return self.fusion or "diff"


class SyntheticConfig(_Closed):
    """A generated dataset, written once into `data.root` when that folder has no tiles yet."""

    n_train: int = Field(64, ge=1, le=100_000)
    n_val: int = Field(16, ge=1, le=100_000)
    # 2048 px x 6 bands of float32 is 100 MB a tile: beyond that generation would fill the disk, not test anything
    tile_size: int = Field(64, ge=16, le=2048)
    num_bands: int = Field(6, ge=1, le=256)
    seed: int = 0


class TerraTorchDataConfig(_Closed):
    """A TerraTorch datamodule given as in a `terratorch fit` config (class_path + init_args)."""

    class_path: str
    init_args: dict[str, Any] = Field(default_factory=dict)


class DataConfig(_Closed):
    # data.nodata may be NaN (`.nan`): the one float here where a non-finite value means something
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=(), allow_inf_nan=True)

    kind: Literal["geotiff", "synthetic", "terratorch"] = "synthetic"
    root: str = "data/synthetic"
    train_images: str = "train/images/*.tif"
    train_labels: str = "train/labels/*.tif"
    val_images: str = "val/images/*.tif"
    val_labels: str = "val/labels/*.tif"
    # 1-based band indices as rasterio counts them; None = all bands of the tile.
    bands: list[int] | None = None
    # JSON with per-band "mean"/"std"; computed from the training tiles when the file is absent.
    stats: str | None = None
    nodata: float | None = None
    flips: bool = True
    batch_size: int = Field(8, ge=1, le=65536)
    num_workers: int = Field(0, ge=0, le=256)
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    terratorch: TerraTorchDataConfig | None = None

    @model_validator(mode="after")
    def _terratorch_needs_module(self) -> "DataConfig":
        if self.kind == "terratorch" and self.terratorch is None:
            raise ValueError("data.kind is 'terratorch' but data.terratorch is missing: give class_path and init_args")
        return self


class OptimConfig(_Closed):
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0, le=10)
    weight_decay: float = Field(0.01, ge=0, le=10)
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = Field(0.9, ge=0, lt=1)

    @model_validator(mode="after")
    def _betas_in_range(self) -> "OptimConfig":
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas {list(self.betas)}: each must be in [0, 1), e.g. [0.9, 0.999]")
        return self


class SchedulerConfig(_Closed):
    name: Literal["constant", "cosine", "linear"] = "cosine"
    warmup_steps: int = Field(0, ge=0, le=MAX_STEPS)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)


class LoraConfig(_Closed):
    """Overrides of the profile's LoRA settings; unset keys keep the profile's values."""

    rank: int | None = Field(None, ge=1)
    alpha: int | None = Field(None, ge=1)
    dropout: float | None = Field(None, ge=0, lt=1)
    target_modules: list[str] | None = None


# The memory profiles by name (trainer.memory.profiles defines what each does; tests/unit/test_config.py keeps the
# two in step) and `auto` (the planner picks one at the start of a run).
PROFILE_NAMES = ("full", "zero2", "zero3", "zero3_offload_optimizer", "zero3_offload", "zero3_nvme", "lora", "qlora",
                 "zero3_offload_lora", "auto")
ProfileName = Literal[PROFILE_NAMES]  # type: ignore[valid-type]


class MemoryConfig(_Closed):
    """How the model is fitted in memory. `profile` names a bundle (see trainer.memory.profiles);
    `deepspeed` is a preset name from ds_configs/ or a path to the user's own DeepSpeed JSON."""

    profile: ProfileName = "full"
    deepspeed: str | None = None
    # Where ZeRO-Infinity (profile zero3_nvme) swaps parameters and optimizer states: a fast local NVMe dir.
    nvme_path: str | None = None
    # Per-experiment adjustments of the profile (None keeps the profile's choice).
    grad_checkpointing: bool | None = None
    quantization: Literal["none", "nf4", "int8"] | None = None
    lora: LoraConfig | None = None
    # Budgets for `profile: auto` (and `terrascale plan`), e.g. "24GiB", "64GiB". Unset: the detected GPU (else
    # a 24 GiB RTX 4090) and this machine's RAM. Setting gpu_memory below the card's size keeps room for others.
    gpu_memory: str | int | None = None
    cpu_memory: str | int | None = None
    # How the trainable parameters' optimizer states are stored. adamw: torch's optimizer named by optim.name,
    # fp32 states (8 bytes per trainable parameter with Adam/AdamW). adamw_8bit: bitsandbytes' AdamW8bit, both
    # moments blockwise-quantized to 8 bits (~2 bytes per parameter; tensors under 4096 elements stay fp32).
    # paged_adamw_8bit: the same in CUDA unified memory, evicted to CPU RAM under GPU memory pressure (on a
    # CPU-only host, plain adamw_8bit). Both need optim.name: adamw and no DeepSpeed
    # (trainer.memory.profiles.check_deepspeed).
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = "adamw"

    @model_validator(mode="after")
    def _sizes(self) -> "MemoryConfig":
        from trainer.units import parse_size

        problems = []
        for key in ("gpu_memory", "cpu_memory"):
            value = getattr(self, key)
            if value is not None:
                try:
                    if parse_size(value, f"memory.{key}") <= 0:
                        problems.append(f"memory.{key}: {value!r} must be a positive size")
                except ConfigError as e:
                    problems.extend(e.issues)
        if self.profile == "auto" and self.deepspeed is not None:
            # auto plans its candidates on their own DeepSpeed presets (or none): the JSON would then run under a
            # choice that was never planned with it, and turn a profile without DeepSpeed into one with it
            problems.append(f"memory.deepspeed: {self.deepspeed!r} cannot be combined with memory.profile: auto, "
                            "which plans and picks among the profiles' own DeepSpeed presets; name the profile the "
                            "JSON is for (e.g. memory.profile=zero3_offload) or drop memory.deepspeed")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class RunConfig(_Closed):
    max_steps: int | None = Field(200, ge=1, le=MAX_STEPS)
    max_epochs: int | None = Field(None, ge=1, le=10**6)
    grad_accum: int = Field(1, ge=1, le=65536)
    grad_clip: float | None = Field(1.0, gt=0)
    eval_every: int = Field(50, ge=1, le=MAX_STEPS)
    log_every: int = Field(10, ge=1, le=MAX_STEPS)
    checkpoint_every: int = Field(50, ge=1, le=MAX_STEPS)
    seed: int = 0
    # auto: the profile's dtype on a GPU, fp32 on CPU (bf16 is ~10x slower than fp32 on CPUs like ours).
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    progress: bool = True
    # Stop cleanly (checkpoint saved) once this step is reached; re-running continues. For time-boxed
    # allocations (a SLURM slot, a shared workstation overnight) and for testing resume.
    stop_at_step: int | None = Field(None, ge=1, le=MAX_STEPS)
    # Experiment trackers through Accelerate; mlflow/wandb when installed (offline, in the job dir), "all".
    trackers: list[Literal["tensorboard", "mlflow", "wandb", "all"]] = Field(default_factory=lambda: ["tensorboard"])

    @model_validator(mode="after")
    def _needs_a_length(self) -> "RunConfig":
        if self.max_steps is None and self.max_epochs is None:
            raise ValueError("set run.max_steps or run.max_epochs: the run needs a length")
        return self


class CheckpointConfig(_Closed):
    dir: str = "runs/demo"
    keep_last: int = Field(3, ge=1, le=10_000)
    # false: start fresh (refuses a job dir that already has checkpoints); auto: newest complete one; or a path.
    resume: bool | str = "auto"
    export: bool = True

    @model_validator(mode="after")
    def _resume_value(self) -> "CheckpointConfig":
        if self.resume is True:
            raise ValueError("checkpoint.resume: use 'auto', false, or a checkpoint path (true is ambiguous)")
        return self


class TerraTorchSpec(_Closed):
    """A `terratorch fit` file's model/data/optimizer/lr_scheduler sections, verbatim: TerraTorch's own
    LightningCLI parser instantiates them (trainer.model.terratorch_task); `trainer.terratorch_compat` fills this."""

    config: dict[str, Any]
    source: str | None = None
    # trainer.check_val_every_n_epoch: validate (and checkpoint) every N epochs; None: run.eval_every decides
    eval_every_epochs: int | None = Field(None, ge=1, le=10**6)
    custom_modules_path: str | None = None


class Experiment(_Closed):
    name: str = "experiment"
    model: ModelConfig = Field(default_factory=ModelConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    memory: MemoryConfig = Field(default_factory=MemoryConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    # set for `terratorch fit` (LightningCLI) files: TerraTorch builds task, model, loss, metrics, datamodule
    terratorch: TerraTorchSpec | None = None

    @model_validator(mode="after")
    def _native_fusion_is_prithvis(self) -> "Experiment":
        # one ViT over all T frames (num_frames=T) is a Prithvi ability; other backbones take one date at a time
        if self.task.date_fusion == "native" and not self.model.backbone.startswith("prithvi"):
            raise ValueError(f"task.fusion: 'native' is Prithvi's multi-frame input; {self.model.backbone!r} takes "
                             "one date at a time: use task.fusion=diff or concat")
        return self

    @model_validator(mode="after")
    def _eight_bit_states_are_adamw(self) -> "Experiment":
        if self.memory.optimizer != "adamw" and self.optim.name != "adamw":
            raise ValueError(f"memory.optimizer: {self.memory.optimizer!r} is bitsandbytes' 8-bit AdamW, but "
                             f"optim.name is {self.optim.name!r}: set optim.name: adamw, or memory.optimizer: adamw "
                             f"to keep {self.optim.name} with fp32 states")
        return self

    @property
    def job_dir(self) -> Path:
        return Path(self.checkpoint.dir)


# ---------------------------------------------------------------------------------------------------
# Loading, overrides, error reporting


def _parse_scalar(text: str) -> Any:
    """`key=value` overrides are YAML scalars: 3e-4, true, null, [1,2] and 'auto' all mean what they say."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides to a nested dict (new dict; input untouched)."""
    import copy

    out = copy.deepcopy(raw)
    problems = []
    for item in overrides:
        if "=" not in item:
            problems.append(f"override {item!r}: write it as key=value, e.g. optim.lr=3e-4")
            continue
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = out
        for p in parts[:-1]:
            nxt = node.get(p)
            if not isinstance(nxt, dict):
                nxt = {}
                node[p] = nxt
            node = nxt
        node[parts[-1]] = _parse_scalar(value)
    if problems:
        raise ConfigError(problems, source="command line")
    return out


def _fields_at(model: type[BaseModel], path: tuple[Any, ...]) -> list[str]:
    """Valid field names of the section that `path` (the parent of an unknown key) points at."""
    cls: Any = model
    for part in path:
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)) or part not in cls.model_fields:
            return []
        ann = cls.model_fields[part].annotation
        args = getattr(ann, "__args__", ())
        cls = next((a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None)
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        return list(cls.model_fields)
    return []


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def format_validation_error(err: ValidationError, model: type[BaseModel] = None) -> list[str]:
    model = model or Experiment
    issues = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            valid = _fields_at(model, loc[:-1])
            near = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
            hint = f"did you mean '{'.'.join([*map(str, loc[:-1]), near[0]])}'?" if near else (
                f"valid keys here: {', '.join(valid)}" if valid else "remove it")
            issues.append(f"{key}: unknown key; {hint}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            got = e.get("input")
            got_s = "" if isinstance(got, dict) or got is None else f" (got {got!r})"
            if e["type"] == "literal_error" and isinstance(got, str):  # a near-typo of one of the names
                import re

                near = difflib.get_close_matches(got, re.findall(r"'([^']*)'", e["ctx"]["expected"]), n=1)
                got_s += f"; did you mean '{near[0]}'?" if near else ""
            if isinstance(got, str) and _is_number(got):
                got_s += "; YAML reads 1e6 as text: write 1.0e6 (or 1000000)"
            issues.append(f"{key}: {msg}{got_s}")
    return issues


def build_experiment(raw: dict[str, Any], source: str | None = None) -> Experiment:
    try:
        return Experiment.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e), source=source) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"config file {path} does not exist: check the --config path"], source=str(path))
    try:
        raw = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError([f"{path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}): save it "
                           "as UTF-8 (e.g. iconv -f latin1 -t utf-8)"], source=str(path)) from None
    except yaml.YAMLError as e:
        raise ConfigError([f"{path} is not valid YAML: {e}"], source=str(path)) from None
    if raw is None:
        raise ConfigError([f"{path} is empty: an experiment needs at least a model: section (start from "
                           "launch/configs/demo.yaml)"], source=str(path))
    if not isinstance(raw, dict):
        raise ConfigError([f"{path} must hold a mapping of sections (model:, data:, ...), not a "
                           f"{type(raw).__name__}"], source=str(path))
    return raw


def load_raw(path: str | Path | None, overrides: list[str] | None = None) -> dict[str, Any]:
    """The experiment as a plain dict: the YAML (a `terratorch fit` file translated), overrides applied."""
    raw: dict[str, Any] = read_yaml(path) if path is not None else {}
    from trainer.terratorch_compat import from_lightning_config, is_lightning_config, split_overrides

    overrides = list(overrides or [])
    if is_lightning_config(raw):
        # `trainer.max_epochs=2`, `model.init_args.loss=dice`: the LightningCLI file's own keys, before translation
        theirs, overrides = split_overrides(overrides)
        raw = from_lightning_config(apply_overrides(raw, theirs), source=str(path))
    return apply_overrides(raw, overrides)


def _missing_model(raw: dict[str, Any]) -> list[str]:
    # The defaults alone are not a model (a ViT backbone needs necks): a file must say what it trains.
    if raw.get("model") is None and raw.get("terratorch") is None:
        raw.pop("model", None)
        return ["model: section missing; name at least model.backbone (and its necks/decoder), "
                "as in launch/configs/demo.yaml"]
    return []


def experiment_from_raw(raw: dict[str, Any], source: str, from_file: bool = True) -> Experiment:
    """Validate a `load_raw` dict; every problem (missing model section included) raised together."""
    raw = dict(raw)
    problems = _missing_model(raw) if from_file else []
    try:
        exp = Experiment.model_validate(raw)
    except ValidationError as e:
        problems += format_validation_error(e)
    if problems:
        raise ConfigError(problems, source=source)
    return exp


def load_experiment(path: str | Path | None, overrides: list[str] | None = None) -> Experiment:
    """Read a terrascale YAML, or a `terratorch fit` (LightningCLI) YAML, apply overrides, validate.

    The checks that need TerraTorch's registries (backbone/neck/decoder kwargs, band names) are
    `trainer.train.validate.load_checked`'s, which `terrascale train` runs."""
    raw = load_raw(path, overrides)
    return experiment_from_raw(raw, source=str(path) if path else "defaults", from_file=path is not None)


def dump_experiment(exp: Experiment) -> str:
    return yaml.safe_dump(exp.model_dump(mode="json"), sort_keys=False)


# The experiment `terrascale train` runs when no --config is given.
DEMO_CONFIG = Path(__file__).resolve().parents[1] / "launch" / "configs" / "demo.yaml"
