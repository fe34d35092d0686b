"""What a study scores: (query, passage) pairs and, when there are any, graded relevance judgments (qrels).

Four sources, all turned into the same pairs file and TREC qrels file in the study's work folder:

- our pairs JSONL (``{"qid","query","docid","text"[,"title","instruction"]}``) with TREC qrels (``qid 0 docid rel``)
  or BEIR qrels (``query-id<TAB>corpus-id<TAB>score`` with that header);
- a BEIR folder (``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``) with a first-stage TREC run
  (``qid Q0 docid rank score tag``) reranked to ``depth`` documents per query: the queries of the split's qrels that
  the run ranks, and for each its first ``depth`` documents by score;
- an ``ir_datasets`` id (its docs, queries and qrels, and its ``scoreddocs`` as the first stage unless a run is
  given); ir_datasets downloads on first use, so offline it needs a copy of ``~/.ir_datasets`` made on a connected
  machine;
- an MTEB retrieval or reranking task (its ``top_ranked`` documents per query), with queries and documents as mteb
  hands them to a cross-encoder (the document is ``(title + " " + text).strip()``, an instruction stays separate).

The official evaluation applies a dataset prompt per MTEB task (:mod:`rank1_local.core.dataset_prompts`). It is
picked the same way here: from ``--dataset TASK[/SUBSET]``, else from the MTEB task, else from a BEIR dataset's name
(``scifact`` is the official ``SciFact``), else none.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rank1_local.core.errors import Rank1Error
from rank1_local.core.extras import require
from rank1_local.runs.atomic import write_text_atomic
from rank1_local.runs.inputs import PairRow, read_jsonl, read_pairs

logger = logging.getLogger(__name__)

Qrels = dict[str, dict[str, int]]
# BEIR dataset names (folder names, ir_datasets ids "beir/NAME[/split]") -> the MTEB task the official code knows
BEIR_TASKS = {"scifact": "SciFact", "climate-fever": "ClimateFEVER", "trec-covid": "TRECCOVID", "arguana": "ArguAna",
              "dbpedia-entity": "DBPedia", "fiqa": "FiQA2018", "nfcorpus": "NFCorpus",
              "webis-touche2020": "Touche2020", "scidocs": "SCIDOCS"}
SHOW = 5


@dataclass(frozen=True)
class StudyInputs:
    """The pairs to score (grouped by query, in first-stage order), the qrels (None without judgments), where they
    came from, and the MTEB task (``TASK[/SUBSET]``) whose official dataset prompt applies, if any."""

    pairs: list[PairRow]
    qrels: Qrels | None
    source: str
    dataset: str | None = None

    @property
    def queries(self) -> list[str]:
        return list(dict.fromkeys(p.qid for p in self.pairs))


@dataclass(frozen=True)
class WrittenInputs:
    pairs_file: Path
    qrels_file: Path | None
    digest: str  # of the pairs and qrels as written: a work folder holds one study's inputs


# --- files -----------------------------------------------------------------------------------------------------------

def _lines(path: Path) -> Iterator[tuple[int, str]]:
    if not path.is_file():
        raise Rank1Error(f"{path}: no such file")
    with open(path, encoding="utf-8") as f:
        try:
            for n, line in enumerate(f, 1):
                if line.strip():
                    yield n, line.rstrip("\n")
        except UnicodeDecodeError as exc:
            raise Rank1Error(f"{path}: not valid UTF-8 ({exc.reason})") from None


def read_qrels(path: Path) -> Qrels:
    """TREC qrels (``qid iter docid grade``) or BEIR qrels (``query-id corpus-id score`` after that header line)."""
    qrels: Qrels = {}
    for n, line in _lines(path):
        cols = line.split()
        if n == 1 and cols[:2] == ["query-id", "corpus-id"]:
            continue
        if len(cols) == 4:
            qid, _, docid, grade = cols
        elif len(cols) == 3:
            qid, docid, grade = cols
        else:
            raise Rank1Error(f"{path}:{n}: a qrels line is 'qid 0 docid grade' (TREC) or 'query-id corpus-id score' "
                             f"(BEIR), got {len(cols)} columns")
        try:
            qrels.setdefault(qid, {})[docid] = int(grade)
        except ValueError:
            raise Rank1Error(f"{path}:{n}: relevance grade must be an integer, got {grade!r}") from None
    if not qrels:
        raise Rank1Error(f"{path}: no judgments")
    return qrels


def read_trec_run(path: Path, depth: int) -> dict[str, list[str]]:
    """A TREC run (``qid Q0 docid rank score tag``): per query (in file order) its first ``depth`` documents by score
    (descending; the rank column breaks ties)."""
    if depth < 1:
        raise Rank1Error(f"--depth must be at least 1, got {depth}")
    entries: dict[str, list[tuple[float, int, str]]] = {}
    seen: set[tuple[str, str]] = set()
    for n, line in _lines(path):
        cols = line.split()
        if len(cols) != 6:
            raise Rank1Error(f"{path}:{n}: a TREC run line is 'qid Q0 docid rank score tag', got {len(cols)} columns")
        qid, _, docid, rank, score, _ = cols
        try:
            value, position = float(score), int(rank)
        except ValueError:
            raise Rank1Error(f"{path}:{n}: rank must be an integer and score a number, got {rank!r} {score!r}") \
                from None
        if (qid, docid) in seen:
            raise Rank1Error(f"{path}:{n}: document {docid!r} ranked twice for query {qid!r}")
        seen.add((qid, docid))
        entries.setdefault(qid, []).append((-value, position, docid))
    if not entries:
        raise Rank1Error(f"{path}: empty run")
    return {qid: [d for _, _, d in sorted(rows)[:depth]] for qid, rows in entries.items()}


def pair_row_json(row: PairRow) -> dict[str, str]:
    out = {"qid": row.qid, "query": row.query, "docid": row.docid, "text": row.text}
    if row.title:
        out["title"] = row.title
    if row.instruction:
        out["instruction"] = row.instruction
    return out


def write_inputs(inputs: StudyInputs, folder: Path) -> WrittenInputs:
    """Write the pairs (and qrels) into ``folder``; rewriting identical inputs leaves the files as they are."""
    folder.mkdir(parents=True, exist_ok=True)
    pairs_text = "".join(json.dumps(pair_row_json(r), ensure_ascii=False) + "\n" for r in inputs.pairs)
    qrels_text = "".join(f"{q} 0 {d} {g}\n" for q, docs in (inputs.qrels or {}).items() for d, g in docs.items())
    digest = hashlib.sha256((pairs_text + "\x00" + qrels_text).encode()).hexdigest()
    pairs_file, qrels_file = folder / "pairs.jsonl", folder / "qrels.txt"
    for path, text in ((pairs_file, pairs_text), (qrels_file, qrels_text if inputs.qrels else None)):
        if text is None:
            continue
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            write_text_atomic(path, text)
    return WrittenInputs(pairs_file, qrels_file if inputs.qrels else None, digest)


# --- sources ---------------------------------------------------------------------------------------------------------

def _dataset_from_name(name: str) -> str | None:
    return BEIR_TASKS.get(name.lower())


def _check_pairs(pairs: list[PairRow], source: str) -> None:
    if not pairs:
        raise Rank1Error(f"{source}: no pairs to score")


def from_pairs_file(pairs_file: Path, qrels_file: Path | None = None) -> StudyInputs:
    pairs = read_pairs(pairs_file)
    qrels = read_qrels(qrels_file) if qrels_file is not None else None
    return StudyInputs(pairs, qrels, f"pairs file {pairs_file.name}" + (f", qrels {qrels_file.name}" if qrels_file
                                                                         else ", no qrels"))


def _rerank_pairs(ranking: dict[str, list[str]], queries: dict[str, tuple[str, str | None]],
                  docs: dict[str, tuple[str | None, str]], qrels: Qrels | None, source: str) -> list[PairRow]:
    """Pairs of the judged queries the first stage ranks, in its order; a document the corpus lacks is an error."""
    judged = set(qrels) if qrels is not None else None
    missing_queries = [q for q in ranking if q not in queries]
    if missing_queries:
        raise Rank1Error(f"{source}: the run ranks queries the dataset does not have: {missing_queries[:SHOW]}")
    missing_docs = sorted({d for docids in ranking.values() for d in docids if d not in docs})
    if missing_docs:
        raise Rank1Error(f"{source}: the run ranks {len(missing_docs)} documents the corpus does not have, e.g. "
                         f"{missing_docs[:SHOW]}")
    pairs = []
    skipped = 0
    for qid, docids in ranking.items():
        if judged is not None and qid not in judged:
            skipped += 1
            continue
        query, instruction = queries[qid]
        for docid in docids:
            title, text = docs[docid]
            pairs.append(PairRow(qid, query, docid, text, title or None, instruction))
    if skipped:
        logger.info("%s: %d ranked queries have no judgments in this split and are left out", source, skipped)
    if judged is not None:
        unranked = len(judged - set(ranking))
        if unranked:
            logger.warning("%s: %d judged queries are not in the first-stage run (left out)", source, unranked)
    _check_pairs(pairs, source)
    return pairs


def _read_beir_jsonl(path: Path, wanted: set[str] | None) -> Iterator[tuple[str, dict[str, Any]]]:
    """(id, row) of the rows of a BEIR ``corpus.jsonl`` / ``queries.jsonl`` that ``wanted`` names (all if None), each
    checked: an ``_id`` (string or integer), a ``text`` string, and ``title`` / ``instruction`` strings when given."""
    for n, row in read_jsonl(path):
        if "_id" not in row:
            raise Rank1Error(f"{path}:{n}: a BEIR row needs '_id'")
        row_id = row["_id"]
        if isinstance(row_id, bool) or not isinstance(row_id, (str, int)) or row_id == "":
            raise Rank1Error(f"{path}:{n}: _id must be a non-empty string or an integer, got {json.dumps(row_id)[:40]}")
        if wanted is not None and str(row_id) not in wanted:
            continue
        if not isinstance(row.get("text"), str):
            raise Rank1Error(f"{path}:{n}: text must be a string, got {json.dumps(row.get('text'))[:40]}")
        for name in ("title", "instruction"):
            if row.get(name) is not None and not isinstance(row[name], str):
                raise Rank1Error(f"{path}:{n}: {name} must be a string, got {json.dumps(row[name])[:40]}")
        yield str(row_id), row


def from_beir(folder: Path, run: Path, *, depth: int = 100, split: str = "test") -> StudyInputs:
    """A BEIR folder with a first-stage run reranked to ``depth``. Only the corpus rows the run needs are kept."""
    if not folder.is_dir():
        raise Rank1Error(f"{folder}: no such BEIR folder")
    for part in ("corpus.jsonl", "queries.jsonl", f"qrels/{split}.tsv"):
        if not (folder / part).is_file():
            raise Rank1Error(f"{folder}: not a BEIR folder (no {part})")
    qrels = read_qrels(folder / "qrels" / f"{split}.tsv")
    ranking = read_trec_run(run, depth)
    ranking = {q: d for q, d in ranking.items() if q in qrels}
    needed = {d for docids in ranking.values() for d in docids}
    queries = {qid: (r["text"], r.get("instruction") or None)
               for qid, r in _read_beir_jsonl(folder / "queries.jsonl", set(ranking))}
    docs = {docid: (r.get("title") or None, r["text"]) for docid, r in _read_beir_jsonl(folder / "corpus.jsonl", needed)}
    source = f"BEIR folder {folder.name} ({split}), first stage {run.name} to depth {depth}"
    pairs = _rerank_pairs(ranking, queries, docs, qrels, source)
    return StudyInputs(pairs, qrels, source, _dataset_from_name(folder.name))


def _doc_fields(doc: Any) -> tuple[str | None, str]:
    text = getattr(doc, "text", None)
    if not isinstance(text, str):
        return None, doc.default_text()
    title = getattr(doc, "title", None)
    return (title if isinstance(title, str) and title else None), text


def from_ir_datasets(dataset_id: str, run: Path | None = None, *, depth: int = 100) -> StudyInputs:
    """An ir_datasets id: its queries, docs and qrels; the first stage is ``run`` or the dataset's scoreddocs."""
    ir_datasets = require("ir_datasets", "ir-datasets", "--ir-datasets")
    try:
        dataset = ir_datasets.load(dataset_id)
    except KeyError:
        raise Rank1Error(f"--ir-datasets {dataset_id}: ir_datasets does not know this id") from None
    if not (dataset.has_queries() and dataset.has_docs()):
        raise Rank1Error(f"--ir-datasets {dataset_id}: the dataset has no queries or no documents to rerank")
    try:
        qrels: Qrels | None = None
        if dataset.has_qrels():
            qrels = {}
            for q in dataset.qrels_iter():
                qrels.setdefault(q.query_id, {})[q.doc_id] = int(q.relevance)
        if run is not None:
            ranking = read_trec_run(run, depth)
        elif dataset.has_scoreddocs():
            scored: dict[str, list[tuple[float, str]]] = {}
            for s in dataset.scoreddocs_iter():
                scored.setdefault(s.query_id, []).append((-float(s.score), s.doc_id))
            ranking = {q: [d for _, d in sorted(rows)[:depth]] for q, rows in scored.items()}
        else:
            raise Rank1Error(f"--ir-datasets {dataset_id}: the dataset has no first-stage ranking (scoreddocs); "
                             "pass --run FIRST_STAGE.trec")
        if qrels is not None:
            ranking = {q: d for q, d in ranking.items() if q in qrels}
        queries = {q.query_id: (q.default_text(), None) for q in dataset.queries_iter() if q.query_id in ranking}
        needed = sorted({d for docids in ranking.values() for d in docids})
        docs = {d.doc_id: _doc_fields(d) for d in dataset.docs_store().get_many_iter(needed)}
    except Rank1Error:
        raise
    except Exception as exc:  # downloads, missing local copies, corrupt files: ir_datasets' own errors
        raise Rank1Error(f"--ir-datasets {dataset_id}: ir_datasets could not read the dataset ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); it downloads on first use, so "
                         "offline it needs a copy of ~/.ir_datasets (or $IR_DATASETS_HOME) from a connected "
                         "machine") from None
    source = f"ir_datasets {dataset_id}, first stage {run.name if run else 'its scoreddocs'} to depth {depth}"
    pairs = _rerank_pairs(ranking, queries, docs, qrels, source)
    parts = dataset_id.split("/")
    dataset_name = _dataset_from_name(parts[1]) if len(parts) > 1 and parts[0] == "beir" else None
    return StudyInputs(pairs, qrels, source, dataset_name)


def from_mteb(task: Any, *, split: str = "test", subset: str | None = None, depth: int | None = None) -> StudyInputs:
    """An MTEB retrieval/reranking task (a name, or a task object whose data can be loaded) with its top-ranked
    documents per query; the official dataset prompt of that task and subset applies."""
    if isinstance(task, str):
        mteb = require("mteb", "mteb", "--mteb")
        try:
            task = mteb.get_task(task)
        except Exception as exc:
            raise Rank1Error(f"--mteb {task}: {str(exc).splitlines()[0][:200]}") from None
    name = task.metadata.name
    try:
        if not getattr(task, "data_loaded", False):
            task.load_data()
        subsets = task.dataset
    except Exception as exc:
        raise Rank1Error(f"--mteb {name}: could not load the task's data ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); mteb downloads it from the Hugging "
                         "Face hub on first use") from None
    subset = subset or ("default" if "default" in subsets else next(iter(subsets)))
    if subset not in subsets or split not in subsets[subset]:
        raise Rank1Error(f"--mteb {name}: no subset {subset!r} with split {split!r} (subsets: {sorted(subsets)})")
    data = subsets[subset][split]
    top_ranked = data.get("top_ranked")
    if not top_ranked:
        raise Rank1Error(f"--mteb {name}: the task has no top-ranked documents to rerank (a reranking task has)")
    qrels = {str(q): {str(d): int(g) for d, g in docs.items()} for q, docs in data["relevant_docs"].items()}
    ranking = {str(q): [str(d) for d in docids][:depth] for q, docids in top_ranked.items()}
    queries = {str(r["id"]): (r["text"], r.get("instruction") or None) for r in data["queries"]}
    docs = {str(r["id"]): (None, (str(r.get("title") or "") + " " + str(r.get("text") or "")).strip())
            for r in data["corpus"]}
    key = name if subset == "default" else f"{name}/{subset}"
    source = f"MTEB task {key} ({split})"
    return StudyInputs(_rerank_pairs(ranking, queries, docs, qrels, source), qrels, source, key)

