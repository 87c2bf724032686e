"""Configs are documented data: dataclasses with one help line per field, its type, and its allowed range, set
from YAML files and `--set key=value` overrides (dotted keys reach into sections: `--set eval.n=100`).
Everything is checked at start-up: unknown keys fail with a close-match suggestion, and a wrong type, a
non-finite number or a value out of range fails with one line naming the field, the value and what is allowed.

Sections shared by every command live here once: `EvalConfig` (the held-out eval), `RewardConfig` (the reward
and the task scorer) and `DataConfig` (warm-up traces)."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping, Sequence, TypeVar

from .configlib import build, opt, section, to_dict
from .errors import SmolthinkError

T = TypeVar("T")


# ----------------------------------------------------------------------------------------------- sections


@dataclass
class EvalConfig:
    """The held-out evaluation every command shares (`smolthink eval`, the pipeline, both training stages)."""

    n: int = opt(400, "held-out eval questions", ge=0)
    balanced: bool = opt(True, "balance answer classes (e.g. 50% Yes / 50% No) where a task has a small answer set")
    max_new_tokens: int = opt(256, "generation length of eval completions", ge=1)
    samples: int = opt(1, "completions per question; > 1 adds pass@k and mean@k (needs temperature > 0)", ge=1)
    temperature: float = opt(0.0, "sampling temperature (0: greedy)", ge=0)
    top_p: float = opt(0.95, "nucleus sampling when temperature > 0", gt=0, le=1)
    batch_size: int = opt(64, "questions per generation batch", ge=1)
    engine_precision: str = opt("bf16", "fast engine's linear layers for evals and GRPO rollouts: bf16 (fp32 "
                                "accumulation, norms, attention and sampling; only on CPUs with bf16 dot "
                                "products, else fp32) | fp32", choices=("bf16", "fp32"))
    every: int = opt(0, "training: evaluate every N optimizer steps (0: only at start and end)", ge=0)
    at_start: bool = opt(True, "training: evaluate before the first step")


@dataclass
class RewardConfig:
    """The reward: weighted parts, scored strictly by the task's own scorer in the sandbox."""

    correct_weight: float = opt(0.85, "weight of strict correctness", ge=0)
    format_weight: float = opt(0.15, "weight of the think/answer format", ge=0)
    strict: bool = opt(True, "strict correctness (False: the task scorer's partial credit)")
    length_penalty: float = opt(0.0, "overlong penalty coefficient (0: off)", ge=0)
    length_target: int = opt(200, "tokens after which the overlong penalty starts", ge=0)
    functions: list[str] = opt([], "extra rewards 'module:function[=weight]'")
    scorer_timeout: float = opt(2.0, "seconds a task scorer may run before it scores 0", gt=0, le=3600)


@dataclass
class DataConfig:
    """Warm-up traces: where they come from and how many (`smolthink data`, the pipeline, `smolthink sft`)."""

    path: str = opt("", "traces JSONL to train SFT on (empty: generate them from `source`)")
    task: Any = opt(None, "task or mixture the traces' questions come from, same forms as `task` (None: the run's "
                          "task); e.g. an easier setting of it, where a teacher or solver covers only part of the task")
    source: str = opt("auto", "auto (per task: the scripted solver where one exists, else the local teacher, topped up "
                      "with format-only traces) | scripted | teacher | api",
                      choices=("auto", "scripted", "teacher", "api"))
    num_traces: int = opt(1760, "verified traces to keep (the default pipeline: 220 SFT steps of 8)", ge=1)
    balanced: bool = opt(True, "equal answer classes per task where a task has a small answer set")
    teacher_model: str | None = opt(None, "local teacher for source=teacher or auto (default: the policy's model)")
    samples_per_question: int = opt(4, "teacher samples per question (the first that verifies is kept)", ge=1)
    temperature: float = opt(0.8, "teacher sampling temperature", gt=0)
    max_new_tokens: int = opt(300, "teacher generation length", ge=1)
    top_up_rounds: int = opt(3, "extra rounds of fresh questions to replace rejected ones", ge=0)
    teacher_questions: int = opt(64, "source=auto: questions the local teacher tries in all (split over the teacher "
                                 "tasks by weight; samples_per_question samples each) before format-only top-up; "
                                 "about 2 s a question on 2 cores with the embedded model", ge=0)
    format_only_top_up: bool = opt(True, "source=auto: fill a teacher task's shortfall with short format-only traces "
                                   "(the question restated, then the verified answer), labelled format_only; off: "
                                   "a task no teacher trace verifies for stops the data stage")
    api_base_url: str | None = opt(None, "OpenAI-compatible base URL for source=api (default $OPENAI_BASE_URL)")
    api_model: str | None = opt(None, "API model name (default $OPENAI_MODEL; key from $OPENAI_API_KEY)")
    api_concurrency: int = opt(8, "concurrent API requests", ge=1, le=256)


@dataclass
class CurriculumConfig:
    """Difficulty scheduling through reasoning-gym's own curricula (`grpo.curriculum.*`): fresh train questions are
    generated at the current level of each task's difficulty attributes, raised when the rolling accuracy of the
    last `window` groups of fresh questions is above `raise_above`, lowered below `lower_below`."""

    enabled: bool = opt(False, "generate train questions at a moving difficulty level (tasks with a curriculum)")
    attributes: list[str] = opt([], "attributes to move, 'attr' or 'task.attr' (empty: every attribute of each task)")
    start_level: int | None = opt(None, "level every moved attribute starts at (None: the level that reproduces the "
                                        "task's configured difficulty, else 0)", ge=0)
    raise_above: float = opt(0.7, "raise one level when the window's group accuracy is above this", ge=0, le=1)
    lower_below: float = opt(0.2, "lower one level when the window's group accuracy is below this", ge=0, le=1)
    window: int = opt(16, "groups of fresh questions at the current level that decide a move", ge=1)


@dataclass
class ReplayConfig:
    """Prioritised replay (`grpo.replay.*`): train questions the policy got wrong or right only sometimes are kept
    with their latest group pass rate p and drawn again with weight 1 - p; solved questions (p = 1) leave."""

    fraction: float = opt(0.0, "share of each rollout batch's questions drawn from the replay pool (0: off)",
                          ge=0, le=1)
    pool_size: int = opt(1024, "questions the pool holds (the oldest leave first)", ge=1)
    max_repeats: int = opt(2, "times one question may be replayed before it leaves the pool", ge=1)


@dataclass
class PassKConfig:
    """The pipeline's sampled eval (`passk.*`): k samples per question on the first n held-out questions, for the
    SFT model, the GRPO model and the SFT-only control -> pass@k and mean@k."""

    enabled: bool = opt(True, "run the pass@k / mean@k eval stage")
    n: int = opt(100, "questions (the first n of the held-out eval set)", ge=1)
    k: int = opt(4, "samples per question", ge=2)
    temperature: float = opt(0.7, "sampling temperature", gt=0)
    top_p: float = opt(0.95, "nucleus sampling", gt=0, le=1)


@dataclass
class TransferConfig:
    """The transfer table (pipeline stage `transfer`): the base and the final model on reasoning-gym tasks outside
    the training mixture, so a model that learned one task and forgot how to answer others shows."""

    tasks: list[str] = opt(["letter_counting", "aiw", "gcd"], "tasks to evaluate (any in the training mixture are "
                           "skipped; []: none); short answers the base model's prose sometimes gets right")
    n: int = opt(50, "questions per transfer task (the eval section's other settings apply)", ge=1)


# ----------------------------------------------------------------------------------------------- stages

LR_SCHEDULES = ("constant", "linear", "cosine")
ENGINES = ("auto", "fast", "hf", "paged")  # rollout.make_engine


@dataclass
class RunArgs:
    """What every command runs on: the model, the task, the base seed, the threads."""

    model: str | None = opt(None, "hub id, local dir, .gguf file, or None for the embedded SmolLM2-135M-Instruct")
    task: Any = opt("syllogism", "reasoning-gym task name, 'a:2,b:1' mixture, or list of {name, weight, config}")
    seed: int = opt(0, "base seed: every other seed derives from it (seeds.derive_seed)")
    threads: int = opt(0, "torch threads (0: all cores)", ge=0)


@dataclass
class StageConfig(RunArgs):
    """Fields every training stage shares: model, task, LoRA, optimizer, schedule, checkpoints, eval, reward."""

    use_lora: bool = opt(True, "train a LoRA adapter (False: full fine-tuning)")
    lora_r: int = opt(32, "LoRA rank", ge=1)
    lora_alpha: int = opt(64, "LoRA alpha", gt=0)
    lora_dropout: float = opt(0.0, "LoRA dropout", ge=0, lt=1)
    lora_target_modules: list[str] = opt(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                          "down_proj"], "modules that get LoRA adapters")
    gradient_checkpointing: bool = opt(False, "recompute activations in backward to save memory")
    max_tokens_per_forward: int = opt(512, "split each micro-batch into forward/backward chunks of at most this "
                                      "many padded tokens (0: no split); same gradient, lower peak memory", ge=0)
    onednn_linears: bool = opt(True, "CPU: LoRA layers (one merged W + sBA GEMM) and frozen layers (LM head) train "
                                     "through oneDNN (fp32: the same math; one merged weight copy)")
    precision: str = opt("auto", "training GEMMs: auto (bf16 where it is native, else fp32) | fp32 | bf16 (bf16 on "
                                 "CPU: the oneDNN layers' forward and input-gradient GEMMs in bf16 with fp32 "
                                 "accumulation; LoRA weights, optimizer, norms, attention and log-softmax stay fp32; "
                                 "needs onednn_linears, use_lora and avx512_bf16. On CUDA: the forward under "
                                 "torch.autocast bf16, fp32 master weights, log-softmax and loss)",
                         choices=("auto", "fp32", "bf16"))
    learning_rate: float = opt(1e-5, "peak learning rate (AdamW)", gt=0, le=1)
    lr_scheduler_type: str = opt("constant", "constant | linear | cosine (after warm-up)", choices=LR_SCHEDULES)
    warmup_steps: int = opt(0, "linear warm-up optimizer steps", ge=0)
    weight_decay: float = opt(0.0, "AdamW weight decay", ge=0)
    adam_beta1: float = opt(0.9, "AdamW beta1", ge=0, lt=1)
    adam_beta2: float = opt(0.99, "AdamW beta2", ge=0, lt=1)
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0: off)", ge=0)
    max_nonfinite_steps: int = opt(3, "stop the run after this many optimizer steps in a row skipped for a NaN or "
                                      "inf loss or gradient", ge=1)
    max_steps: int = opt(10, "optimizer steps to train", ge=0)
    save_every: int = opt(0, "checkpoint every N optimizer steps (0: only at the end and on interrupt)", ge=0)
    keep_checkpoints: int = opt(2, "how many step checkpoints to keep", ge=1)
    log_every: int = opt(1, "console line every N steps", ge=1)
    eval: EvalConfig = section(EvalConfig, "held-out eval")
    reward: RewardConfig = section(RewardConfig, "reward parts and the task scorer")


@dataclass
class GRPOConfig(StageConfig):
    """GRPO: experience collection then clipped-surrogate training on random minibatches (TRL knob names)."""

    prompts_per_rollout: int = opt(4, "questions per rollout batch", ge=1)
    num_generations: int = opt(4, "completions per question (G)", ge=2)
    max_completion_length: int = opt(256, "max new tokens per completion", ge=1)
    temperature: float = opt(0.7, "sampling temperature (rollouts and log-prob scaling)", gt=0)
    top_p: float = opt(0.95, "nucleus sampling", gt=0, le=1)
    top_k: int = opt(0, "top-k sampling (0: off)", ge=0)
    buffer_size: int = opt(16, "completions collected per rollout phase before training on them", ge=1)
    minibatch_size: int = opt(8, "sequences per forward/backward (micro-batch)", ge=1)
    gradient_accumulation_steps: int = opt(2, "micro-batches per optimizer step", ge=1)
    num_iterations: int = opt(1, "passes (epochs) over each buffer", ge=1)
    epsilon: float = opt(0.2, "PPO clip range below 1 (and above, unless epsilon_high)", gt=0, lt=1)
    epsilon_high: float | None = opt(None, "upper clip range (DAPO clip-higher); None: same as epsilon", gt=0)
    beta: float = opt(0.0, "KL coefficient to the reference policy (k3 estimator); 0: no reference pass", ge=0)
    entropy_coef: float = opt(0.0, "entropy bonus coefficient", ge=0)
    loss_type: str = opt("dapo", "grpo (per-sequence mean) | dapo (token mean) | dr_grpo (constant normaliser)",
                         choices=("grpo", "dapo", "dr_grpo"))
    scale_rewards: str = opt("group", "advantage scaling: group | batch | none", choices=("group", "batch", "none"))
    mask_truncated_completions: bool = opt(False, "exclude completions cut at max length from the loss")
    drop_zero_std_groups: bool = opt(False, "drop groups whose rewards are all equal and keep sampling (DAPO)")
    max_resample_attempts: int = opt(4, "cap on extra rollout batches per buffer fill when dropping groups", ge=0)
    group_by_length: bool = opt(True, "length-aware minibatches to cut padding")
    share_prompts: bool = opt(True, "training forwards run each GRPO group's prompt once and its completions on "
                                    "its KV cache (P + G*C tokens instead of G*(P+C)); same loss and gradient; "
                                    "off under gradient_checkpointing")
    engine: str = opt("auto", "rollout engine: auto (fast on CPU, hf on CUDA) | fast | hf | paged (transformers' "
                              "continuous batching)", choices=ENGINES)
    train_size: int = opt(5000, "train questions generated (disjoint from eval)", ge=1)
    balanced_train: bool = opt(True, "equal answer classes among the train questions where a task has a small answer "
                                     "set, as in the eval and the warm-up traces (reasoning-gym's syllogisms are "
                                     "2/3 'Yes': unbalanced questions reward the prior)")
    sample_every: int = opt(5, "write samples/ every N steps (0: never)", ge=0)
    curriculum: CurriculumConfig = section(CurriculumConfig, "difficulty scheduling (reasoning-gym curricula)")
    replay: ReplayConfig = section(ReplayConfig, "prioritised replay of questions not yet solved every time")


@dataclass
class SFTConfig(StageConfig):
    """Warm-up supervised fine-tuning on reasoning traces (loss on assistant tokens only)."""

    data: DataConfig = section(DataConfig, "the traces to train on (or to generate)")
    num_epochs: int = opt(1, "passes over the traces", ge=1)
    max_steps: int = opt(0, "optimizer steps (0: from num_epochs)", ge=0)
    learning_rate: float = opt(4e-4, "peak learning rate (AdamW)", gt=0, le=1)
    lr_scheduler_type: str = opt("cosine", "constant | linear | cosine (after warm-up)", choices=LR_SCHEDULES)
    warmup_steps: int = opt(5, "linear warm-up optimizer steps", ge=0)
    minibatch_size: int = opt(8, "sequences per forward/backward", ge=1)
    gradient_accumulation_steps: int = opt(1, "micro-batches per optimizer step", ge=1)
    max_length: int = opt(512, "max tokens per training sequence (longer ones are dropped)", ge=2)
    max_tokens_per_forward: int = opt(1024, "split each micro-batch into forward/backward chunks of at most this "
                                      "many computed tokens (0: no split); same gradient; 1024 lets 3-4 traces share "
                                      "one system-prompt prefix (512 holds one): faster, for more peak memory "
                                      "(benchmarks/README.md)", ge=0)
    log_every: int = opt(5, "console line every N steps", ge=1)
    max_seconds: float = opt(0.0, "stop after this many seconds of training, checked between optimizer steps "
                                  "(0: no limit)", ge=0)
    share_prefix: bool = opt(True, "training forwards run the common prompt prefix of each chunk's traces (the chat "
                                   "template's system turn) once and the rest of each on its KV cache; same loss "
                                   "and gradient; off under gradient_checkpointing")


@dataclass
class PipelineConfig(RunArgs):
    """One YAML, one run directory: base eval -> warm-up traces -> SFT -> GRPO (with `rl`) -> final eval -> SFT-only
    control -> pass@k -> report. Top-level keys apply to every stage; `sft:`, `grpo:` and `control:` hold stage-specific
    overrides."""

    eval: EvalConfig = section(EvalConfig, "held-out eval of every stage")
    reward: RewardConfig = section(RewardConfig, "reward parts and the task scorer")
    data: DataConfig = section(DataConfig, "warm-up traces")
    transfer: TransferConfig = section(TransferConfig, "base vs final model on tasks outside the mixture")
    sft: dict = opt({}, "SFTConfig overrides for the SFT stage")
    rl: bool = opt(False, "run the GRPO stage after SFT (off: the SFT model is the final model; on every task measured "
                          "so far, SFT for the GRPO stage's minutes taught as much or more: README Results)")
    grpo: dict = opt({}, "GRPOConfig overrides for the GRPO stage")
    sft_control: bool = opt(False, "run the SFT-only control: SFT continued for the GRPO stage's wall time (needs rl; "
                                   "off by default: it doubles the RL stage's time; on for any claim that the RL pays)")
    control: dict = opt({}, "SFTConfig overrides for the sft_control stage (after the `sft:` section's)")
    passk: PassKConfig = section(PassKConfig, "pass@k / mean@k of the SFT, GRPO and control models")


@dataclass
class EvalRunConfig(RunArgs):
    """`smolthink eval`: one model on a task's held-out set."""

    engine: str = opt("auto", "generation engine: auto (fast on CPU, hf on CUDA) | fast | hf | paged (transformers' "
                              "continuous batching)", choices=ENGINES)
    eval: EvalConfig = section(EvalConfig, "held-out eval")
    reward: RewardConfig = section(RewardConfig, "reward parts and the task scorer")


@dataclass
class DataRunConfig(RunArgs):
    """`smolthink data`: verified warm-up traces on train questions, never the eval set's (same seed as the eval;
    `model` is the default local teacher)."""

    data: DataConfig = section(DataConfig, "warm-up traces")
    eval: EvalConfig = section(EvalConfig, "the held-out eval set whose questions are excluded")
    reward: RewardConfig = section(RewardConfig, "the task scorer that verifies each trace")


# Keys that moved into a section: older config.yaml files and commands keep loading.
MOVED_KEYS = {
    "packed_linears": "onednn_linears",
    "eval_n": "eval.n", "eval_balanced": "eval.balanced", "eval_every": "eval.every",
    "eval_at_start": "eval.at_start", "eval_max_new_tokens": "eval.max_new_tokens",
    "correct_weight": "reward.correct_weight", "format_weight": "reward.format_weight",
    "strict_scoring": "reward.strict", "length_penalty": "reward.length_penalty",
    "length_target": "reward.length_target", "reward_functions": "reward.functions",
    "scorer_timeout": "reward.scorer_timeout",
    "num_traces": "data.num_traces", "data_source": "data.source", "teacher_model": "data.teacher_model",
}


def build_config(cls: type[T], sources: Sequence[Mapping[str, Any] | None]) -> T:
    """Merge mappings (later wins; nested sections or dotted keys; MOVED_KEYS read under their new names) into a
    validated `cls`."""
    cfg = build(cls, sources, MOVED_KEYS)
    validate(cfg)
    return cfg


def validate(cfg: Any) -> None:
    """Checks that involve more than one field (each field's own range is checked as it is read)."""
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise SmolthinkError(msg)

    if hasattr(cfg, "task"):
        from .tasks import parse_tasks

        parse_tasks(cfg.task)
    if isinstance(getattr(cfg, "transfer", None), TransferConfig) and cfg.transfer.tasks:
        parse_tasks(cfg.transfer.tasks)
    if isinstance(getattr(cfg, "data", None), DataConfig) and cfg.data.task is not None:
        parse_tasks(cfg.data.task)
    ev = getattr(cfg, "eval", None)
    if isinstance(ev, EvalConfig):
        need(ev.samples == 1 or ev.temperature > 0, "eval.samples > 1 needs eval.temperature > 0 (e.g. 0.7)")
    if isinstance(cfg, StageConfig) and cfg.precision == "bf16":  # fp32 and auto run anywhere: no torch import
        from .precision import precision_problem, training_device

        problem = precision_problem(cfg.precision, cfg.onednn_linears, cfg.use_lora, training_device())
        need(problem is None, problem or "")
    if isinstance(cfg, PipelineConfig):
        need(cfg.rl or not cfg.sft_control, "sft_control: true needs rl: true (the control trains for the GRPO "
             "stage's wall time)")
    if isinstance(cfg, (EvalRunConfig, PipelineConfig)):  # their result is an eval: 0 questions give nothing
        need(cfg.eval.n >= 1, f"bad value for eval.n: {cfg.eval.n} (expected value >= 1: 0 questions evaluate nothing)")
    if isinstance(cfg, GRPOConfig):
        need(cfg.buffer_size >= cfg.minibatch_size, "buffer_size must be >= minibatch_size")
        need(cfg.train_size >= cfg.prompts_per_rollout, "train_size must be >= prompts_per_rollout")
        cur = cfg.curriculum
        need(cur.lower_below < cur.raise_above, "curriculum.lower_below must be < curriculum.raise_above")
        if cur.enabled:
            from .curriculum import build_curricula
            from .tasks import parse_tasks

            build_curricula(parse_tasks(cfg.task), cur)  # unknown attributes, levels out of range: one line


def build_pipeline_config(sources: Sequence[Mapping[str, Any] | None]) -> PipelineConfig:
    """Merge and validate a pipeline config, including its sft/grpo sections (built now, not an hour later)."""
    cfg = build_config(PipelineConfig, sources)
    for name, build_stage in (("sft", lambda: stage_config(cfg, SFTConfig)),
                              ("grpo", lambda: stage_config(cfg, GRPOConfig)), ("control", lambda: control_config(cfg))):
        try:
            build_stage()
        except SmolthinkError as e:  # the pipeline-wide keys passed above, so the stage's section is at fault
            raise SmolthinkError(f"in the pipeline's {name}: section: {e}") from None
    return cfg


def final_stage(cfg: PipelineConfig) -> str:
    """The training stage whose model is the pipeline's final model: grpo, or sft when the config has no RL."""
    return "grpo" if cfg.rl else "sft"


def _shared(cfg: PipelineConfig, cls: type) -> dict[str, Any]:
    """The pipeline's keys every stage of class `cls` takes."""
    shared = {**{f.name: getattr(cfg, f.name) for f in fields(RunArgs)}, "eval": to_dict(cfg.eval),
              "reward": to_dict(cfg.reward)}
    if cls is SFTConfig:
        shared["data"] = to_dict(cfg.data)
    return shared


def stage_config(cfg: PipelineConfig, cls: type[T], **fixed: Any) -> T:
    """The config of one pipeline stage: the pipeline's shared keys, then `fixed` (what the pipeline wires, e.g.
    the SFT model path), then the stage's own section."""
    own = cfg.sft if cls is SFTConfig else cfg.grpo
    return build_config(cls, [_shared(cfg, cls), fixed, own])


# The sft_control stage's own defaults: its length is set by the clock (`max_seconds`), so its step cap is out of
# the way and its learning rate constant after warm-up (a decay needs a known step count).
CONTROL_DEFAULTS = {"max_steps": 0, "num_epochs": 10_000, "lr_scheduler_type": "constant"}


def control_config(cfg: PipelineConfig, **fixed: Any) -> SFTConfig:
    """The sft_control stage's config: the SFT stage's (shared keys, `sft:`), then CONTROL_DEFAULTS, then the
    `control:` section, then `fixed` (the pipeline's wiring: start model, traces, time budget)."""
    return build_config(SFTConfig, [_shared(cfg, SFTConfig), cfg.sft, CONTROL_DEFAULTS, cfg.control, fixed])
