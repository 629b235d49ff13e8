"""The config schema: one dataclass per section, every key with its type and default.

``OmegaConf.structured(Config)`` turns these into a config that rejects unknown keys and values
of the wrong type, naming the key (:func:`fedvlm.config.load_config`); docs/recipes.md lists every
key. Components with options (``federation.strategy``, ``federation.codec``, ``data.partition``,
``federation.byzantine.attack``) are typed ``Any`` here and checked against the options dataclass
their component registered.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
    """``simulation`` (synchronous rounds), ``async`` (buffered asynchronous aggregation, FedBuff:
    ``buffer_size`` updates make one new global model, each weighted by ``staleness``) or
    ``centralized``."""
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
    """How clients pack their updates (``none``, ``fp16``, ``int8``, ``topk`` ...) and its options;
    ``fedvlm.federation.codecs``."""
    evaluate_clients: bool = True
    evaluate_clients_per_round: int = 0
    """Clients asked to validate in a round (a seeded sample); 0 = every client. The last round
    always asks every client, so the run's final metrics are over all sites."""
    evaluate_every: int = 1
    """Federated evaluation every N rounds (and always after the last)."""
    num_cpus_per_client: float = 1.0
    num_gpus_per_client: float = 0.0
    buffer_size: int = 3
    """``mode=async``: client updates per aggregation (K of FedBuff)."""
    staleness: Any = "exponential"
    """``mode=async``: how an update's weight decays with its staleness τ (global versions since
    the model it trained from): ``{name: exponential, lam: 0.5}`` (e^(−λτ), Eq. 31 of Fed-MMX) or
    ``{name: polynomial, a: 0.5}`` ((1+τ)^−a); ``fedvlm.federation.asynchronous``. A server
    learning rate is the strategy's: ``{name: fedavgm, server_learning_rate: η, server_momentum: 0}``."""
    weight_by_duration: bool = False
    """``mode=async``: weight each update by its example count × its task's duration (relative to
    the mean) × s(τ), over the buffer's examples without renormalising, so that over time each
    client weighs by its data as in FedAvg, however fast it is
    (``fedvlm.federation.staleness.duration_weights``). Without it, Eq. 31 normalised within
    the buffer: fast clients make most versions."""
    max_virtual_time: float = 0.0
    """Stop once the virtual clock passes this (both modes; 0: no limit): a run of a simulated
    duration rather than of a number of rounds."""
    max_staleness: int = 10
    """``mode=async``: updates staler than this are dropped (counted as ``dropped_stale``)."""
    client_speed: Any = "none"
    """Simulated compute speed of each client on the virtual clock: ``none`` (all equal) or
    ``{name: lognormal, sigma: 1.0}`` (a seeded factor e^(σz) per client); ``fedvlm.federation.clock``."""
    dropout: float = 0.0
    """Simulated probability that a client given work vanishes before it replies."""
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
    take it past ``max_epsilon`` and the run stops. ``target_epsilon`` instead sets each client's σ
    so that its whole run ends at ε ≤ the target (and refuses to go past it).
    """

    dp: bool = False
    noise_multiplier: float = 1.0
    target_epsilon: float | None = None
    """Calibrate σ per client for ε ≤ this over all the rounds it is sampled in (``noise_multiplier``
    is then not used): :func:`fedvlm.privacy.dp.calibrated_noise`."""
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
