"""Offline English text for held-out evaluation, and a disjoint calibration text from the same source.

The calibration fallback (calibration_data.builtin_texts) is Python's own documentation; the
evaluation text must be something else. Every machine that reaches PyPI can have this one:
the Lee news corpus (300 short English news articles, about 80k SmolLM2 tokens) that
gensim's wheel ships as test data, gensim/test/test_data/lee_background.cor. The file is read
from the installed package without importing gensim (`pip install --no-deps gensim` suffices;
gensim's own dependencies are not needed).

The articles are split in a fixed way: the last EVAL_DOCUMENTS are the held-out evaluation
text, the others may be used for calibration. The split never changes, so numbers from
different runs and machines compare.

    python -m winaconv.use.eval_text --eval-out eval.jsonl --calib-out calib.jsonl
"""

import importlib.util
import json
from pathlib import Path

from ..errors import WinaconvError

PACKAGE = "gensim"
RELATIVE_PATH = ("test", "test_data", "lee_background.cor")
EVAL_SOURCE = "builtin:lee-news-eval"
CALIB_SOURCE = "builtin:lee-news-calib"
EVAL_DOCUMENTS = 100  # the last 100 of the 300 articles: about 27k SmolLM2 tokens
INSTALL_HINT = "pip install --no-deps gensim"


def lee_corpus_path() -> Path:
    """Where the installed gensim wheel keeps the Lee background corpus."""
    spec = importlib.util.find_spec(PACKAGE)  # found, never imported: gensim's import needs numpy and scipy
    if spec is None or not spec.submodule_search_locations:
        raise WinaconvError(f"the built-in held-out text needs the {PACKAGE} package ({INSTALL_HINT}), or pass --text-file")
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*RELATIVE_PATH)
    if not path.is_file():
        raise WinaconvError(f"{PACKAGE} is installed but has no {'/'.join(RELATIVE_PATH)}; pass --text-file")
    return path


def lee_documents() -> list[str]:
    """The 300 articles of the Lee corpus, one per line in the file."""
    lines = lee_corpus_path().read_text(encoding="utf-8", errors="replace").splitlines()
    return [line.strip() for line in lines if line.strip()]


def eval_texts() -> list[str]:
    """Held-out evaluation text: the last EVAL_DOCUMENTS articles."""
    return lee_documents()[-EVAL_DOCUMENTS:]


def calibration_texts() -> list[str]:
    """Calibration text disjoint from eval_texts(): the other articles of the same corpus."""
    return lee_documents()[:-EVAL_DOCUMENTS]


def write_text_file(texts: list[str], path: str | Path) -> Path:
    """.jsonl: one {"text": article} a line, read back by calibration_data.read_text_file as the same list
    of texts (so --text-file/--calib-file give the same tokens as the built-in text); otherwise plain
    text, one article per paragraph."""
    out = Path(path)
    if out.suffix == ".jsonl":
        out.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    else:
        out.write_text("\n\n".join(texts) + "\n", encoding="utf-8")
    return out


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--eval-out", help="write the held-out evaluation text here")
    parser.add_argument("--calib-out", help="write the (disjoint) calibration text here")
    args = parser.parse_args(argv)
    if not (args.eval_out or args.calib_out):
        parser.error("give --eval-out and/or --calib-out")
    try:
        if args.eval_out:
            print(write_text_file(eval_texts(), args.eval_out))
        if args.calib_out:
            print(write_text_file(calibration_texts(), args.calib_out))
    except WinaconvError as exc:
        raise SystemExit(f"Error: {exc}") from None


if __name__ == "__main__":
    main()
