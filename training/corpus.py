"""The demo corpus: docstrings of Python's own standard library (PSF license), read from the
.py files of the interpreter running this, never downloaded.

Two files: `stdlib-docs.jsonl`, one pretraining document per module (its docstring and those of
its classes and functions, each under its qualified name), and `stdlib-chat.jsonl`, chat SFT
examples that ask what a function or class does and answer with its docstring's first paragraph.
The files are the same for the same Python version. Sources are parsed with `ast`, not imported
(importing every stdlib module has side effects).

    python -m training.corpus OUT_DIR      # writes both files into OUT_DIR
"""

from __future__ import annotations

import ast
import json
import os
import re
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

BUILTINS = {"builtin:stdlib-docs": "stdlib-docs.jsonl", "builtin:stdlib-chat": "stdlib-chat.jsonl"}
# Test suites and bundled third-party code are not the library's own prose; private modules
# (_pydecimal, ...) mostly repeat their public twins.
_SKIP_PARTS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3",
               "ensurepip", "turtledemo", "venv"}


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not _SKIP_PARTS & set(p.relative_to(root).parts[:-1])
             and not any(part.startswith("_") for part in module_name(p).split("."))]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def module_name(path: Path) -> str:
    rel = path.relative_to(Path(sysconfig.get_paths()["stdlib"])).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def docstrings(path: Path) -> Iterator[tuple[str, str]]:
    """(qualified name, docstring) for the module and each class and function, in source order."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    name = module_name(path)
    doc = ast.get_docstring(tree)
    if doc:
        yield name, doc

    def walk(node: ast.AST, prefix: str) -> Iterator[tuple[str, str]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if child.name.startswith("_"):
                    continue
                qual = f"{prefix}.{child.name}"
                doc = ast.get_docstring(child)
                if doc:
                    yield qual, doc
                if isinstance(child, ast.ClassDef):
                    yield from walk(child, qual)

    yield from walk(tree, name)


def first_paragraph(doc: str, max_chars: int = 400) -> str:
    """The docstring's first paragraph on one line, cut at a sentence end under max_chars."""
    para = " ".join(doc.strip().split("\n\n")[0].split())
    if len(para) <= max_chars:
        return para
    cut = para[:max_chars]
    end = max(cut.rfind(". "), cut.rfind(".\n"))
    return cut[:end + 1] if end > 0 else cut.rsplit(" ", 1)[0] + " ..."


def write_docs(path: Path, max_bytes: int = 4_000_000) -> int:
    """One JSONL document per module, up to about max_bytes of text; returns the document count."""
    path.parent.mkdir(parents=True, exist_ok=True)
    total = count = 0
    with path.open("w", encoding="utf-8") as f:
        for file in stdlib_files():
            blocks = [f"{name}\n\n{doc}" for name, doc in docstrings(file)]
            if not blocks:
                continue
            text = "\n\n".join(blocks)
            f.write(json.dumps({"text": text, "source": module_name(file)}, ensure_ascii=False) + "\n")
            count += 1
            total += len(text.encode())
            if total >= max_bytes:
                break
    return count


def write_chat(path: Path, max_examples: int = 2000) -> int:
    """Chat SFT examples from public functions and classes with a one-paragraph summary."""
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8") as f:
        for file in stdlib_files():
            for name, doc in docstrings(file):
                if "." not in name or not re.match(r"^[A-Z]", doc.strip()):
                    continue  # module docstrings, and fragments like "x.__init__(...) initializes x"
                answer = first_paragraph(doc)
                if len(answer) < 20:
                    continue
                messages = [{"role": "user", "content": f"What does `{name}` do in Python?"},
                            {"role": "assistant", "content": answer}]
                f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
                count += 1
                if count >= max_examples:
                    return count
    return count


def cache_dir() -> Path:
    """Where builtin data is written once and reused: $HERD_CACHE_DIR/training (~/.cache/herd)."""
    return Path(os.environ.get("HERD_CACHE_DIR", "~/.cache/herd")).expanduser() / "training"


def python_tag() -> str:
    # The stdlib, and so the corpus, differs between Python versions.
    return f"py{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"


def materialise(path: str, cache: Path | None = None) -> Path:
    """A data path as a file: builtin:* names are written into the cache (once)."""
    if path not in BUILTINS:
        return Path(path)
    out = (cache or cache_dir()) / f"{python_tag()}-{BUILTINS[path]}"
    if not out.is_file():
        tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
        (write_docs if path == "builtin:stdlib-docs" else write_chat)(tmp)
        tmp.replace(out)  # atomic: a concurrent run reads either nothing or the whole file
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m training.corpus OUT_DIR", file=sys.stderr)
        return 2
    out = Path(args[0])
    docs = write_docs(out / BUILTINS["builtin:stdlib-docs"])
    chats = write_chat(out / BUILTINS["builtin:stdlib-chat"])
    print(f"{out}: {docs} documents, {chats} chat examples (Python {sys.version.split()[0]} stdlib, PSF license)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
