"""Typed configuration: dataclass schemas, recipe YAML merged over defaults, then CLI overrides.

``OmegaConf.structured`` turns the schemas below into a config that rejects unknown keys and
values of the wrong type, naming the key. A recipe (``recipes/<name>.yaml``) is a small diff over
these defaults, and ``key=value`` overrides from the command line are merged last. The fully
resolved config is saved into every run directory so that a run can be repeated exactly.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedvlm.data.prepared import AUGMENTATIONS
from fedvlm.data.sites import read_site_entries, server_test_entry
from fedvlm.errors import ConfigError
from fedvlm.registry import load_plugins, registry_of

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


@dataclass
class SyntheticConfig:
    """Parameters of the seeded synthetic generator (``data.format=synthetic``)."""

    n: int = 5400
    num_sites: int = 10
    positive_fraction: float = 0.55
    p_ambiguous_image: float = 0.25
    p_report_omits_values: float = 0.35


@dataclass
class SyntheticCxrConfig:
    """Chest X-ray generator settings beyond ``data.synthetic.n``/``num_sites`` (task ``cxr``).

    ``prevalence`` overrides per-finding prevalences; ``prevalence_shift`` and ``style_shift``
    scale how much hospitals differ in finding mix and in image style/report template.
    """

    prevalence: dict[str, float] = field(default_factory=dict)
    prevalence_shift: float = 0.5
    style_shift: float = 1.0
    p_followup: float = 0.3


@dataclass
class DataConfig:
    """Where the data comes from and how it is split.

    ``format`` is ``synthetic``, ``auto`` (recognise the layout under ``root``) or a layout name
    (``manifest``, ``all_idb1``, ``all_idb2``, ``cnmc``).
    """

    format: str = "synthetic"
    root: str | None = None
    reports: str | None = None
    image_size: int = 64
    augment: str = "none"
    max_text_length: int = 96
    test_fraction: float = 0.2
    val_fraction: float = 0.1
    partition: Any = field(default_factory=lambda: {"name": "dirichlet"})
    """How the training pool is split across clients: a partitioner and its options
    (``{name: dirichlet, alpha: 0.5}``; ``fedvlm.data.partition``)."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    synthetic_cxr: SyntheticCxrConfig = field(default_factory=SyntheticCxrConfig)
    labels: list[str] = field(default_factory=list)
    """CXR: the labels to train and evaluate (empty: all of the source's labels)."""
    uncertain: str = "ignore"
    """CXR: what an uncertain (-1) CheXpert label becomes: ``ignore`` (unknown), ``zeros``, ``ones``."""
    equalize: bool = True
    """CXR: histogram-equalise each radiograph when preparing the data (scanner/hospital intensity shift)."""
    image_cache: bool = True
    """Each site keeps a cache of its resized images in its own folder (decoded once, when the site
    prepares its data, which validates every file up front); false: the DataLoader decodes and
    resizes the source files in every epoch and nothing is written (``fedvlm.data.streaming``)."""
    server_test: Any = None
    """A test set the coordinator may hold (a public set, never a site's data): a mapping of site
    keys (``format``, ``root``, ``reports`` ...) like a ``data.sites`` entry without ``name``.
    The coordinator prepares all of it as one test split and scores the global model on it each
    evaluated round (``server_test/*`` in ``metrics.jsonl``). Null: none."""
    datamodule_class: str | None = None
    """``task: lightning``: dotted path of the LightningDataModule each client builds for its site,
    as ``DataModule(site=entry)`` (``fedvlm.tasks.lightning.site_entry``)."""
    sites: Any = None
    """The federation's sites, one client each: a list of entries (``name`` plus the source keys of
    ``data``: ``format``, ``root``, ``reports`` ...) or the path of a YAML file holding that list
    (``fedvlm.data.sites``). Each client reads only its own site; ``federation.num_clients`` becomes
    the number of sites. Null: one source (``format``/``root``) split by ``partition``."""


@dataclass
class EncoderConfig:
    """An image or text encoder from the registry.

    ``pretrained`` is a hub id or a local path (file or folder), or null for random init.
    ``options`` are passed to the underlying factory (timm ``create_model`` keyword arguments,
    or ``transformers`` config fields), e.g. ``{depth: 2}``.
    """

    name: str = "vit_micro"
    pretrained: str | None = None
    tokenizer: str | None = None
    vocabulary: str | None = None
    """Text encoders initialised at random: a word list (one token per line) for their word
    tokenizer; null with synthetic data means the generator's own public vocabulary. Never built
    from the sites' reports."""
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class AdapterConfig:
    """Adapter mode (``name: lora``): backbones frozen for the whole run, LoRA matrices trained
    on the linear layers named by the target lists; only trainable parameters travel.
    ``none`` trains the backbones themselves."""

    name: str = "none"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    image_targets: list[str] = field(default_factory=lambda: ["qkv"])
    text_targets: list[str] = field(default_factory=lambda: ["query", "value"])


@dataclass
class ModelConfig:
    """The multimodal model: encoders, fusion, heads and loss weights."""

    image_encoder: EncoderConfig = field(default_factory=lambda: EncoderConfig("vit_micro"))
    text_encoder: EncoderConfig = field(default_factory=lambda: EncoderConfig("bert_micro"))
    modality: str = "fused"
    fusion: str = "concat"
    fusion_dim: int = 128
    dropout: float = 0.1
    modality_dropout: float = 0.0
    num_stages: int = 4
    stage_loss_weight: float = 1.0
    unimodal_loss_weight: float = 0.0
    fusion_gradient_scale: float = 1.0
    """Leukemia task: scale of the gradient the fusion path sends into the encoders (1: joint
    training; 0: each encoder learns only from its auxiliary head, needs unimodal_loss_weight > 0)."""
    late_fusion_weight: float = 0.0
    """Leukemia task: weight w of the image encoder's auxiliary head in the prediction (product of
    experts with the fused heads; 0: the fused heads alone). Fused models only, like
    modality_dropout; needs unimodal_loss_weight > 0."""
    logit_adjustment: float = 0.0
    """Leukemia task: τ of the logit-adjusted loss (0: plain cross-entropy; 1: the loss sees
    ``logits + log π`` with π the class prior of the client's own training data)."""
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    module_class: str | None = None
    module_options: dict[str, Any] = field(default_factory=dict)
    """``task: lightning``: keyword arguments of ``module_class``."""
    freeze_modules: list[str] = field(default_factory=lambda: ["image_encoder", "text_encoder"])
    """Submodules (attribute names) frozen in the first ``federation.freeze_encoders_rounds``
    rounds, by a framework callback (``fedvlm.federation.callback.FreezeModules``)."""


@dataclass
class ContrastiveConfig:
    """The chest X-ray vision-language model (task ``cxr``): FedVLM's Algorithm 2 and Eq. 3.

    ``L = L_InfoNCE + image_loss_weight · L_image + text_loss_weight · L_text`` where the
    unimodal terms are multi-label BCE of a label head on each tower (0 turns them off).
    """

    projection_dim: int = 128
    temperature: float = 0.07
    learn_temperature: bool = True
    image_loss_weight: float = 0.0
    text_loss_weight: float = 0.0


@dataclass
class EvaluationConfig:
    """``fedvlm evaluate`` settings (task ``cxr``).

    ``prompts`` maps a label to ``[positive prompt, negative prompt]`` or to an ensemble
    ``{positive: [...], negative: [...]}``; labels not listed use the data source's defaults
    (the synthetic generator's template wording, else "There is X." / "No X.").
    """

    prompts: dict[str, Any] = field(default_factory=dict)
    few_shot: list[int] = field(default_factory=lambda: [1, 5, 16])
    few_shot_seeds: int = 3
    retrieval_k: list[int] = field(default_factory=lambda: [1, 5, 10])
    select_on: str = "val"
    """Which merged metric selects ``checkpoints/best.ckpt``: ``val`` (the sites' local validation
    splits) or ``test`` (the papers' choice; optimistic, since the test set then chooses the model)."""
    select_metric: str | None = None
    """The metric (without split prefix, higher is better) that selects ``best.ckpt``; null: the
    task's (leukemia ``stage_macro_f1``, cxr ``macro_auroc``); ``task: lightning`` must name one
    its module logs in ``validation_step``."""


@dataclass
class OptimConfig:
    """Local optimiser; ``lr`` decays over rounds when ``lr_schedule=linear``."""

    name: str = "sgd"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_schedule: str = "linear"
    min_lr_fraction: float = 0.0


@dataclass
class TrainerConfig:
    """Passed through to ``lightning.Trainer`` on each client (and the centralized run)."""

    accelerator: str = "cpu"
    devices: Any = 1
    strategy: str = "auto"
    precision: str = "32-true"
    batch_size: int = 32
    local_epochs: int = 1
    num_workers: int = 0
    gradient_clip_val: float | None = None
    deterministic: bool = True


@dataclass
class ByzantineConfig:
    """Simulated malicious clients (``fedvlm.federation.byzantine``): ``attack`` and its options
    (``none``, ``{name: sign_flip, scale: 10}``, ``{name: scale, scale: 10}``,
    ``{name: gaussian, noise_std: 1}``, ``label_flip``) run by ``clients``, or by
    ``⌊fraction·num_clients⌋`` clients drawn with the run's seed when ``clients`` is empty."""

    attack: Any = "none"
    clients: list[int] = field(default_factory=list)
    fraction: float = 0.0


@dataclass
class SecureAggregationConfig:
    """Secure aggregation with Flower's SecAgg+ protocol (``fedvlm.federation.secure``): the
    server learns only the example-weighted sum of the clients' updates.

    Clients send the *delta* ``local − global`` of every floating-point entry; each coordinate of
    ``(n_k / max_weight)·delta`` is clipped to ±``clipping_range`` and stochastically quantised to
    ``quantization_range`` levels. ``max_weight`` null means the largest sampled client's size
    (clients report their size when the run starts). ``num_shares`` ≤ 1 is a fraction of the
    round's clients (1.0: every client shares its keys with every other), > 1 a count;
    ``reconstruction_threshold`` ≤ 1 is a fraction of ``num_shares``, > 1 a count: the fewest
    surviving neighbours from which a dropped client's mask is rebuilt.
    """

    enabled: bool = False
    clipping_range: float = 1.0
    quantization_range: int = 4194304
    max_weight: float | None = None
    num_shares: float = 1.0
    reconstruction_threshold: float = 0.5


@dataclass
class FederationConfig:
    """The federated round loop.

    ``mode`` is ``simulation`` (Flower simulation on Ray, one SuperNode per client) or
    ``centralized`` (one client holding the pooled training data: the paper's centralized
    baseline, through the same code).
    """

    mode: str = "simulation"
    strategy: Any = "fedavg"
    """The aggregation strategy and its options: ``fedavg``, ``{name: fedprox, mu: 0.01}``,
    ``{name: fedavgm, server_learning_rate: 1, server_momentum: 0.9}``, ``{name: trimmed_mean,
    trim_fraction: 0.2}``, ``median``, ``{name: krum, byzantine_f: 1}``, ``{name: multikrum,
    byzantine_f: 1, num_selected: 0}`` (robust ones take ``mu`` too); ``fedvlm.federation.strategies``."""
    rounds: int = 20
    num_clients: int = 10
    clients_per_round: int = 0
    min_clients: int = 1
    freeze_encoders_rounds: int = 0
    convergence_tol: float = 0.0
    round_timeout: float = 3600.0
    codec: Any = "none"
    """How clients pack their updates (``none``, ``fp16``) and its options; ``fedvlm.federation.codecs``."""
    evaluate_clients: bool = True
    num_cpus_per_client: float = 1.0
    num_gpus_per_client: float = 0.0
    exclude_clients: list[int] = field(default_factory=list)
    """Partition ids left out of training (leave-one-hospital-out evaluation)."""
    faults: list[str] = field(default_factory=list)
    """Injected client failures for resilience drills: ``"PID@ROUND"`` raises in that round."""
    byzantine: ByzantineConfig = field(default_factory=ByzantineConfig)
    secure_aggregation: SecureAggregationConfig = field(default_factory=SecureAggregationConfig)


@dataclass
class ExplainConfig:
    """Per-patient SHAP explanations on each client at the end of its local round (task ``leukemia``).

    ``patients`` rows of each client's local validation split (its training split when it has
    no validation data) are explained every ``every`` rounds and written under
    ``RUN_DIR/clients/client_NNN/explanations/round_NNN/``. Nothing leaves the site unless
    ``share_summary`` (then only aggregate quality metrics).
    """

    enabled: bool = False
    patients: int = 4
    every: int = 1
    image_baseline: str = "mean"
    text_baseline: str = "mask"
    max_evals: int = 300
    top_k: int = 5
    share_summary: bool = False


@dataclass
class CentralDPConfig:
    """Central (update-level, user-level) DP: DP-FedAvg, as Flower's fixed-clipping wrappers
    (``fedvlm.privacy.central``; what it guarantees is in docs/privacy.md).

    ``clipping`` is ``none`` (off), ``server`` (the server clips each client's update) or
    ``client`` (each client clips its own update before sending). Updates are clipped to L2 norm
    ``clipping_norm`` (C), averaged uniformly over the round's m clients, and the server adds
    ``N(0, (noise_multiplier·C/m)²)`` to every coordinate; ε is accounted at ``delta``.
    Independent of ``privacy.dp`` (record-level DP-SGD): both may be on.
    """

    clipping: str = "none"
    clipping_norm: float = 1.0
    noise_multiplier: float = 1.0
    delta: float = 1e-5


@dataclass
class PrivacyConfig:
    """Record-level differential privacy of each client's local training: DP-SGD with Opacus
    (``fedvlm.privacy``; what it guarantees is in docs/privacy.md).

    ``noise_multiplier`` is σ, ``max_grad_norm`` the per-sample clipping bound C; the batch size
    becomes the expected batch size of Poisson sampling. ε is accounted over all rounds of a
    client (``accountant``: ``rdp`` or ``prv``) at ``delta``; a client refuses a round that would
    take it past ``max_epsilon`` and the run stops.
    """

    dp: bool = False
    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    accountant: str = "rdp"
    max_epsilon: float | None = None
    poisson_sampling: bool = True
    grad_sample_mode: str = "hooks"
    central: CentralDPConfig = field(default_factory=CentralDPConfig)


@dataclass
class Config:
    """The root of a fedvlm run configuration."""

    recipe: str = "custom"
    task: str = "leukemia"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    explain: ExplainConfig = field(default_factory=ExplainConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)


CHOICES: dict[str, tuple[str, ...]] = {
    "model.modality": ("fused", "image", "text"),
    "data.augment": AUGMENTATIONS,
    "optim.name": ("sgd", "adamw"),
    "optim.lr_schedule": ("linear", "constant"),
    "federation.mode": ("simulation", "centralized"),
    "model.adapter.name": ("none", "lora"),
    "data.uncertain": ("ignore", "zeros", "ones"),
    "privacy.accountant": ("rdp", "prv"),
    "privacy.grad_sample_mode": ("hooks", "functorch"),
    "privacy.central.clipping": ("none", "server", "client"),
    "explain.image_baseline": ("mean", "blur", "black"),
    "explain.text_baseline": ("mask", "remove"),
    "evaluation.select_on": ("val", "test"),
}
COMPONENTS: dict[str, str] = {
    "federation.strategy": "fedvlm.strategies",
    "federation.codec": "fedvlm.codecs",
    "data.partition": "fedvlm.partitioners",
    "federation.byzantine.attack": "fedvlm.attacks",
}
"""Config keys naming a component with options (``{name: ..., option: value}``) → its plugin group."""

NAMED: dict[str, str] = {
    "model.image_encoder.name": "fedvlm.image_encoders",
    "model.text_encoder.name": "fedvlm.text_encoders",
    "model.fusion": "fedvlm.fusions",
    "task": "fedvlm.tasks",
}
"""Config keys naming a component by name alone → its plugin group."""

MOVED: dict[str, str] = {
    "federation.proximal_mu": "federation.strategy.mu (federation.strategy={name: fedprox, mu: 0.01})",
    "federation.server_learning_rate": "federation.strategy.server_learning_rate (with name: fedavgm)",
    "federation.server_momentum": "federation.strategy.server_momentum (with name: fedavgm)",
    "federation.trim_fraction": "federation.strategy.trim_fraction (with name: trimmed_mean)",
    "federation.byzantine_f": "federation.strategy.byzantine_f (with name: krum or multikrum)",
    "federation.multikrum_m": "federation.strategy.num_selected (with name: multikrum)",
    "federation.robust_proximal": "federation.strategy.mu (a robust strategy sends FedProx's μ when mu > 0)",
    "federation.update_codec": "federation.codec",
    "federation.byzantine.scale": "federation.byzantine.attack.scale (with name: sign_flip or scale)",
    "federation.byzantine.noise_std": "federation.byzantine.attack.noise_std (with name: gaussian)",
    "data.partition.site_fallback": "data.partition.fallback (with name: site)",
}
"""Flat keys of earlier versions → where their setting lives now (an old recipe fails naming it)."""


def list_recipes(recipes_dir: Path = RECIPES_DIR) -> dict[str, str]:
    """Recipe names mapped to the first line of their leading comment."""
    recipes: dict[str, str] = {}
    for path in sorted(recipes_dir.glob("*.yaml")):
        first = path.read_text().splitlines()[:1]
        recipes[path.stem] = first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""
    return recipes


def recipe_path(recipe: str, recipes_dir: Path = RECIPES_DIR) -> Path:
    """Resolve a recipe name (``leukemia_demo``) or a YAML path.

    Raises:
        ConfigError: If no such recipe exists; lists the known recipes.
    """
    candidate = Path(recipe)
    if candidate.suffix in {".yaml", ".yml"} and candidate.is_file():
        return candidate
    path = recipes_dir / f"{recipe}.yaml"
    if not path.is_file():
        known = ", ".join(list_recipes(recipes_dir)) or "(none)"
        raise ConfigError(f"unknown recipe {recipe!r}; known recipes: {known}")
    return path


def load_config(recipe: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Build a run configuration: defaults ← recipe YAML ← ``key=value`` overrides.

    Args:
        recipe: A recipe name, a path to a recipe or saved ``config.yaml``, or None for defaults.
        overrides: Dotted ``key=value`` strings, e.g. ``["federation.rounds=5"]``.

    Returns:
        The merged, validated config (a structured ``DictConfig``: unknown keys still raise).

    Raises:
        ConfigError: Naming the unknown key, the wrongly typed value or the invalid choice.

    Example:
        >>> cfg = load_config(None, ["federation.rounds=3", "federation.strategy=fedprox"])
        >>> cfg.federation.rounds, dict(cfg.federation.strategy)
        (3, {'name': 'fedprox', 'mu': 0.01})
        >>> load_config(None, ["federation.roundz=3"])
        Traceback (most recent call last):
        ...
        fedvlm.errors.ConfigError: federation.roundz=3: Key 'roundz' not in 'FederationConfig'. Did you mean: 'rounds'?
    """
    load_plugins()  # third-party components register before any name is checked
    cfg = OmegaConf.structured(Config)
    if recipe is not None:
        path = recipe_path(str(recipe))
        try:
            recipe_cfg = OmegaConf.load(path)
        except OmegaConfBaseException as err:
            raise ConfigError(f"{path}: {_reason(err)}") from None
        for old, new in MOVED.items():
            if OmegaConf.select(recipe_cfg, old, default=None) is not None:
                raise ConfigError(f"{path}: {old} has moved to {new}")
        try:
            cfg = OmegaConf.merge(cfg, recipe_cfg)
        except OmegaConfBaseException as err:
            raise ConfigError(f"{path}: {_reason(err)}") from None
        if "recipe" not in recipe_cfg:
            cfg.recipe = path.stem
    settle_components(cfg)
    for override in overrides:
        cfg = _apply_override(cfg, override)
        settle_components(cfg)
    server_test_entry(cfg)  # a misspelled key fails here, not when the coordinator prepares it
    sites = read_site_entries(cfg.data.sites)
    if sites is not None:  # the list itself, so the saved config.yaml repeats the run on its own
        cfg.data.sites = sites
        cfg.federation.num_clients = len(sites)
    validate(cfg)
    return cfg


def _apply_override(cfg: DictConfig, override: str) -> DictConfig:
    """Merge one ``key=value``; naming a component (``federation.strategy=fedprox`` or
    ``data.partition.name=iid``) starts it from that component's default options."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form key=value")
    key = override.split("=", 1)[0].strip()
    for old, new in MOVED.items():
        if key == old or key.startswith(f"{old}."):
            raise ConfigError(f"{override}: {old} has moved to {new}")
    try:
        given = OmegaConf.from_dotlist([override])
        slot = next((c for c in COMPONENTS if key in (c, f"{c}.name")), None)
        if slot is None:
            return cast(DictConfig, OmegaConf.merge(cfg, given))
        value = OmegaConf.select(given, key)
        value = OmegaConf.to_container(value) if isinstance(value, DictConfig) else value
        OmegaConf.update(cfg, slot, value if key == slot else {"name": value}, merge=False)
        return cfg
    except OmegaConfBaseException as err:
        raise ConfigError(f"{override}: {_reason(err)}") from None


def settle_components(cfg: DictConfig) -> None:
    """Check every component the config names, and write each with its options in full.

    A component with options (:data:`COMPONENTS`) becomes ``{name, **options}`` with every
    option present, checked against the dataclass it registered; an encoder that declared options
    has its ``options`` checked the same way; names alone (:data:`NAMED`) must be registered.
    User modules named by ``model.module_class`` / ``data.datamodule_class`` are imported first,
    since they may register components.

    Raises:
        ConfigError: Naming the key: an unknown name (listing the valid ones), an unknown option,
            a wrong type or a value out of range.
    """
    for key in ("model.module_class", "data.datamodule_class"):
        dotted = OmegaConf.select(cfg, key)
        if dotted:
            try:
                importlib.import_module(str(dotted).rpartition(".")[0])
            except ImportError as err:
                raise ConfigError(f"{key}={dotted!r} cannot be imported: {err}") from None
    for key, group in COMPONENTS.items():
        registry = registry_of(group)
        value = OmegaConf.select(cfg, key)
        spec = registry.spec(OmegaConf.to_container(value) if isinstance(value, DictConfig) else value, key)
        if spec.get("fallback") is not None:  # data.partition {name: site, fallback: ...}: a partitioner itself
            spec["fallback"] = registry.spec(spec["fallback"], f"{key}.fallback")
        OmegaConf.update(cfg, key, spec, merge=False)
    for key, group in NAMED.items():
        name = OmegaConf.select(cfg, key)
        try:
            registry_of(group).get(str(name))
        except KeyError as err:
            raise ConfigError(f"{key}: {err.args[0]}") from None
    for which, group in (("image_encoder", "fedvlm.image_encoders"), ("text_encoder", "fedvlm.text_encoders")):
        encoder = cfg.model[which]
        registry = registry_of(group)
        if registry.options_of(encoder.name) is not None:
            given = OmegaConf.to_container(encoder.options) if encoder.options else {}
            spec = registry.spec({"name": encoder.name, **given}, f"model.{which}.options")  # type: ignore[dict-item]
            encoder.options = {k: v for k, v in spec.items() if k != "name"}
    for key, group in COMPONENTS.items():  # checks that need the whole run (e.g. Krum's clients per round)
        spec = OmegaConf.select(cfg, key)
        check = getattr(registry_of(group).get(spec.name), "check_config", None)
        if check is not None:
            check(spec, cfg)


def _validate_lightning(cfg: DictConfig) -> None:
    """What ``task: lightning`` (a user's module and DataModule) cannot do: the parts that need
    fedvlm's own data or model."""
    if not cfg.model.module_class or not cfg.data.datamodule_class:
        raise ConfigError("task=lightning needs model.module_class and data.datamodule_class (dotted paths)")
    unsupported = {
        "federation.mode=centralized": cfg.federation.mode == "centralized",
        "federation.byzantine.attack=label_flip": cfg.federation.byzantine.attack.name == "label_flip",
        "explain.enabled=true": bool(cfg.explain.enabled),
        "data.server_test": cfg.data.server_test is not None,
    }
    for setting, used in unsupported.items():
        if used:
            raise ConfigError(
                f"task=lightning does not support {setting}: it needs fedvlm's own data or model "
                "(task=leukemia or task=cxr); a centralized baseline is your DataModule over all data in one Trainer"
            )
    if not cfg.evaluation.select_metric:
        raise ConfigError(
            "task=lightning needs evaluation.select_metric: a metric your module logs in validation_step "
            "(without the val prefix), higher is better, e.g. acc"
        )


def validate(cfg: DictConfig) -> None:
    """Check choices and ranges the type system cannot express.

    Raises:
        ConfigError: Naming the offending key.
    """
    if cfg.task == "lightning":
        _validate_lightning(cfg)
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of: {', '.join(allowed)}")
    positive = {
        "federation.rounds": cfg.federation.rounds,
        "federation.num_clients": cfg.federation.num_clients,
        "federation.min_clients": cfg.federation.min_clients,
        "trainer.batch_size": cfg.trainer.batch_size,
        "trainer.local_epochs": cfg.trainer.local_epochs,
        "model.num_stages": cfg.model.num_stages,
        "data.image_size": cfg.data.image_size,
        "optim.lr": cfg.optim.lr,
        "explain.every": cfg.explain.every,
        "explain.max_evals": cfg.explain.max_evals,
        "explain.top_k": cfg.explain.top_k,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}={value} must be positive")
    if not 0.0 < cfg.data.test_fraction < 1.0:
        raise ConfigError(f"data.test_fraction={cfg.data.test_fraction} must be in (0, 1)")
    if not 0.0 <= cfg.data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={cfg.data.val_fraction} must be in [0, 1)")
    if cfg.federation.clients_per_round > cfg.federation.num_clients:
        raise ConfigError(
            f"federation.clients_per_round={cfg.federation.clients_per_round} exceeds "
            f"federation.num_clients={cfg.federation.num_clients}"
        )
    if cfg.federation.min_clients > cfg.federation.num_clients or (
        cfg.federation.clients_per_round and cfg.federation.min_clients > cfg.federation.clients_per_round
    ):
        raise ConfigError(
            f"federation.min_clients={cfg.federation.min_clients} exceeds the clients asked each round "
            f"(num_clients={cfg.federation.num_clients}, clients_per_round={cfg.federation.clients_per_round})"
        )
    if not 0.0 <= cfg.model.modality_dropout <= 0.5:
        raise ConfigError(f"model.modality_dropout={cfg.model.modality_dropout} must be in [0, 0.5]")
    if cfg.model.unimodal_loss_weight < 0:
        raise ConfigError(f"model.unimodal_loss_weight={cfg.model.unimodal_loss_weight} must be >= 0")
    if not 0.0 <= cfg.model.fusion_gradient_scale <= 1.0:
        raise ConfigError(f"model.fusion_gradient_scale={cfg.model.fusion_gradient_scale} must be in [0, 1]")
    if cfg.model.fusion_gradient_scale == 0 and cfg.model.unimodal_loss_weight == 0:
        raise ConfigError(
            "model.fusion_gradient_scale=0 leaves the encoders without any gradient: set model.unimodal_loss_weight > 0"
        )
    if cfg.model.late_fusion_weight < 0:
        raise ConfigError(f"model.late_fusion_weight={cfg.model.late_fusion_weight} must be >= 0")
    if cfg.model.late_fusion_weight > 0 and cfg.model.modality == "fused" and cfg.model.unimodal_loss_weight == 0:
        raise ConfigError(
            f"model.late_fusion_weight={cfg.model.late_fusion_weight} combines the fused heads with the image "
            "encoder's auxiliary head: set model.unimodal_loss_weight > 0 (or late_fusion_weight=0)"
        )
    if cfg.model.logit_adjustment < 0:
        raise ConfigError(f"model.logit_adjustment={cfg.model.logit_adjustment} must be >= 0")
    bad_excluded = [c for c in cfg.federation.exclude_clients if not 0 <= c < cfg.federation.num_clients]
    if bad_excluded:
        raise ConfigError(f"federation.exclude_clients={bad_excluded}: clients are 0..{cfg.federation.num_clients - 1}")
    if cfg.contrastive.temperature <= 0:
        raise ConfigError(f"contrastive.temperature={cfg.contrastive.temperature} must be positive")
    _validate_byzantine(cfg.federation)
    _validate_secure_aggregation(cfg.federation)
    _validate_privacy(cfg)


def _validate_byzantine(federation: DictConfig) -> None:
    """Simulated Byzantine clients (``federation.byzantine``): who attacks."""
    byzantine = federation.byzantine
    if not 0.0 <= byzantine.fraction < 1.0:
        raise ConfigError(f"federation.byzantine.fraction={byzantine.fraction} must be in [0, 1)")
    outside = [pid for pid in byzantine.clients if not 0 <= pid < federation.num_clients]
    if outside:
        raise ConfigError(
            f"federation.byzantine.clients={list(byzantine.clients)}: clients {outside} are not partitions "
            f"0..{federation.num_clients - 1} (federation.num_clients={federation.num_clients})"
        )
    if byzantine.clients and byzantine.fraction > 0:
        raise ConfigError("federation.byzantine: set clients or fraction, not both")
    drawn = int(byzantine.fraction * federation.num_clients + 1e-9)
    if byzantine.attack.name != "none" and not byzantine.clients and drawn == 0:
        raise ConfigError(
            f"federation.byzantine.attack={byzantine.attack.name} names no client: set federation.byzantine.clients "
            f"or a federation.byzantine.fraction ≥ 1/num_clients"
        )


def _validate_secure_aggregation(federation: DictConfig) -> None:
    """``federation.secure_aggregation``: ranges, and what cannot be computed from a sum alone."""
    secure = federation.secure_aggregation
    if secure.clipping_range <= 0:
        raise ConfigError(f"federation.secure_aggregation.clipping_range={secure.clipping_range} must be positive")
    if not 2 <= secure.quantization_range < 2**31:
        raise ConfigError(
            f"federation.secure_aggregation.quantization_range={secure.quantization_range} must be in [2, 2**31)"
        )
    if secure.max_weight is not None and secure.max_weight <= 0:
        raise ConfigError(f"federation.secure_aggregation.max_weight={secure.max_weight} must be positive")
    for key in ("num_shares", "reconstruction_threshold"):
        value = secure[key]
        if value <= 0 or (value > 1 and value != int(value)):
            raise ConfigError(
                f"federation.secure_aggregation.{key}={value} must be a fraction in (0, 1] or a whole count"
            )
    if not secure.enabled:
        return
    if not _linear(federation):
        raise ConfigError(
            f"federation.secure_aggregation.enabled: the server sees only the sum of the updates, so "
            f"federation.strategy={federation.strategy.name} (which needs each client's update) cannot run; "
            f"use a linear one: {', '.join(_linear_strategies())}"
        )
    if federation.codec.name != "none":
        raise ConfigError(
            f"federation.secure_aggregation.enabled quantises the updates itself: "
            f"federation.codec={federation.codec.name} must be none"
        )
    if federation.mode == "centralized":
        raise ConfigError("federation.secure_aggregation.enabled needs federation.mode=simulation (several clients)")


def _validate_privacy(cfg: DictConfig) -> None:
    """``privacy``: ranges, and the settings under which DP-SGD's guarantee would not hold."""
    privacy = cfg.privacy
    for key in ("noise_multiplier", "max_grad_norm"):
        if privacy[key] <= 0:
            raise ConfigError(f"privacy.{key}={privacy[key]} must be positive")
    if not 0.0 < privacy.delta < 1.0:
        raise ConfigError(f"privacy.delta={privacy.delta} must be in (0, 1)")
    if privacy.max_epsilon is not None and privacy.max_epsilon <= 0:
        raise ConfigError(f"privacy.max_epsilon={privacy.max_epsilon} must be positive (or null: no budget)")
    _validate_central_dp(cfg)
    if not privacy.dp:
        return
    if cfg.task == "cxr" and cfg.model.modality == "fused":
        raise ConfigError(
            "privacy.dp=true with task=cxr needs model.modality=image or text: the fused model's InfoNCE loss "
            "couples the samples of a batch (each pair is every other pair's negative), so one record changes "
            "every per-sample gradient and per-sample clipping bounds nothing; the unimodal label-head losses "
            "are per-sample and can be trained with DP-SGD"
        )
    if cfg.model.logit_adjustment > 0:
        raise ConfigError(
            f"model.logit_adjustment={cfg.model.logit_adjustment} with privacy.dp: the loss would use the exact "
            "label counts of the client's data, which DP-SGD's accounting does not cover; set it to 0"
        )
    if cfg.trainer.gradient_clip_val is not None:
        raise ConfigError(
            f"trainer.gradient_clip_val={cfg.trainer.gradient_clip_val} has no effect under privacy.dp "
            "(DP-SGD clips each sample's gradient to privacy.max_grad_norm): leave it null"
        )
    if str(cfg.trainer.precision) not in ("32-true", "32"):
        raise ConfigError(f"trainer.precision={cfg.trainer.precision}: privacy.dp trains in 32-true precision only")
    if str(cfg.trainer.devices) != "1":
        raise ConfigError(f"trainer.devices={cfg.trainer.devices}: privacy.dp trains each client on one device")


def _validate_central_dp(cfg: DictConfig) -> None:
    """``privacy.central``: ranges, and the strategies its noise is calibrated for."""
    central = cfg.privacy.central
    if central.clipping_norm <= 0:
        raise ConfigError(f"privacy.central.clipping_norm={central.clipping_norm} must be positive")
    if central.noise_multiplier < 0:
        raise ConfigError(f"privacy.central.noise_multiplier={central.noise_multiplier} must be >= 0")
    if not 0.0 < central.delta < 1.0:
        raise ConfigError(f"privacy.central.delta={central.delta} must be in (0, 1)")
    if central.clipping != "none":
        if not _linear(cfg.federation):
            raise ConfigError(
                f"privacy.central.clipping needs a linear federation.strategy ({', '.join(_linear_strategies())}), "
                f"not {cfg.federation.strategy.name!r}: central DP's noise σ·C/m is calibrated to the uniform mean "
                "of clipped updates, and robust aggregation rules are not analysed with it "
                "(set privacy.central.clipping=none)"
            )
        if central.clipping == "server" and cfg.federation.secure_aggregation.enabled:
            raise ConfigError(
                "privacy.central.clipping=server needs each client's update, which "
                "federation.secure_aggregation.enabled hides from the server: use privacy.central.clipping=client"
            )


def _linear(federation: DictConfig) -> bool:
    """Whether ``federation.strategy`` declares a linear aggregate (a weighted mean of the updates)."""
    return bool(getattr(registry_of("fedvlm.strategies").get(federation.strategy.name), "linear", False))


def _linear_strategies() -> list[str]:
    strategies = registry_of("fedvlm.strategies")
    return [name for name in strategies.names() if getattr(strategies.get(name), "linear", False)]


def save_config(cfg: DictConfig, path: Path) -> None:
    """Write the fully resolved config as YAML (reloadable with :func:`load_config`)."""
    path.write_text(OmegaConf.to_yaml(cfg, resolve=True))


def _reason(err: OmegaConfBaseException) -> str:
    return str(err).splitlines()[0]
