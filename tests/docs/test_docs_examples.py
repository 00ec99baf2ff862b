"""The examples of README.md and docs/*.md run as pasted, offline, on the embedded model.

Every ```bash and ```python block is run, unless the line just above its fence is
``<!-- not run: REASON -->`` (multi-GPU launches, benchmarks, minutes-long pipelines, set-up).
Inside a bash block a command whose comment says "online" is skipped: it needs the hub.

- The blocks of one page run in order in one temporary folder, so later examples use what earlier
  ones wrote (``runs/mine`` after the ``train`` example), and the Python blocks of a page share one
  namespace, as in a notebook.
- The folder holds the project's ``recipes/`` and ``accelerate/`` and what the examples name as the
  user's own files: ``my_text.txt``, ``corpus/``,
  ``chats.jsonl``, ``prompts.jsonl``, ``held_out.jsonl``, ``cetvel_data/``, and ``DIR``,
  ``my-model``, ``DiffutronLM-0.3B-Instruct`` standing for model folders (the embedded model).
- ``diffutron ...`` runs in-process through ``diffutron.cli.main`` and must exit 0. Tiny settings are
  appended where a run would take minutes: ``train`` stops after 2 steps of 2 sequences, CETVEL reads
  2 rows per task.
- ``diffutron serve`` builds its app without listening; ``curl`` lines and the ``openai`` client are
  answered by the app of the page's first ``serve`` line, through FastAPI's test client.
- ``diffutron chat`` reads one message, then end of input.
"""

from __future__ import annotations

import io
import json
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUN = re.compile(r"^<!--\s*not run:\s*(\S.*?)\s*-->$")
RUN_LANGS = {"bash": "bash", "sh": "bash", "python": "python"}
# Settings a user would not shorten, made tiny here (appended flags win in argparse).
TINY_FLAGS = {("train",): ["--max-steps", "2", "--batch-size", "2", "--no-progress"],
              ("eval", "cetvel"): ["--limit", "2", "--no-progress"],
              ("eval", "perplexity"): ["--mc-samples", "1", "--no-progress"]}
TINY_PYTHON = [(re.compile(r"\bmax_steps=\d+"), "max_steps=2"), (re.compile(r"\bbatch_size=\d+"), "batch_size=2")]


@dataclass
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    skip: str | None = None  # the not-run reason

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced blocks of a Markdown page, with their not-run markers."""
    lines = page.read_text(encoding="utf-8").splitlines()
    out, i = [], 0
    while i < len(lines):
        m = re.match(r"^\s*```(\S*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith("```"):
            j += 1
        marker = NOT_RUN.match(lines[i - 1].strip()) if i else None
        out.append(Block(page, i + 1, m.group(1).lower(), "\n".join(lines[i + 1:j]) + "\n",
                         marker.group(1) if marker else None))
        i = j + 1
    return out


def runnable_pages() -> list[tuple[Path, list[Block]]]:
    pages = []
    for page in PAGES:
        found = [b for b in blocks(page) if RUN_LANGS.get(b.lang)]
        if found:
            pages.append((page, found))
    return pages


# ---- bash: logical commands with their comments ---------------------------------------------------

def commands(text: str) -> list[tuple[str, str]]:
    """``(command, comment)`` per logical line: quotes may span lines, ``\\`` continues a line."""
    out, cmd, comment, quote, i = [], [], [], None, 0
    in_comment = False
    while i < len(text):
        c = text[i]
        if in_comment:
            if c == "\n":
                in_comment = False
                out.append(("".join(cmd).strip(), "".join(comment).strip()))
                cmd, comment = [], []
            else:
                comment.append(c)
        elif quote:
            cmd.append(c)
            if c == quote:
                quote = None
        elif c in "'\"":
            quote = c
            cmd.append(c)
        elif c == "\\" and text[i + 1:i + 2] == "\n":
            i += 1  # a continued line
        elif c == "\\":  # an escaped character, such as the \' of 'Türkiye'\''nin'
            cmd.append(text[i:i + 2])
            i += 1
        elif c == "#" and (not cmd or cmd[-1].isspace()):
            in_comment = True
        elif c == "\n":
            out.append(("".join(cmd).strip(), "".join(comment).strip()))
            cmd, comment = [], []
        else:
            cmd.append(c)
        i += 1
    if cmd or comment:
        out.append(("".join(cmd).strip(), "".join(comment).strip()))
    return [(c, note) for c, note in out if c]


@dataclass
class Page:
    """What one page's examples share: the folder, the served app, the Python namespace."""

    cwd: Path
    client: object = None  # a started TestClient of the first served app
    namespace: dict = field(default_factory=dict)


def run_cli(argv: list[str], page: Page, monkeypatch) -> None:
    from diffutron.cli import main

    for prefix, extra in TINY_FLAGS.items():
        if tuple(argv[:len(prefix)]) == prefix:
            argv = argv + extra
    if argv[:1] == ["serve"]:
        argv = [("0" if prev == "--port" else a) for prev, a in zip([""] + argv, argv)]
        _serve(argv, page, monkeypatch)
        return
    monkeypatch.setattr(sys, "stdin", io.StringIO("Merhaba!\n" if argv[:1] == ["chat"] else ""))
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse refused the arguments
        code = exit_.code
    assert code == 0, f"`diffutron {shlex.join(argv)}` exited with {code}"


def _serve(argv: list[str], page: Page, monkeypatch) -> None:
    """Build the app as `diffutron serve` does, without listening."""
    import uvicorn

    from diffutron.cli import main

    built = []

    class Server:
        def __init__(self, config):
            built.append(config.app)

        def run(self, sockets=None):
            for s in sockets or ():
                s.close()

    monkeypatch.setattr(uvicorn, "Server", Server)
    assert main(argv) == 0, f"`diffutron {shlex.join(argv)}` failed"
    assert built, "`diffutron serve` built no app"
    if page.client is None:
        from fastapi.testclient import TestClient

        page.client = TestClient(built[0]).__enter__()  # runs the app's start-up (its scheduler)


def run_curl(argv: list[str], page: Page) -> None:
    assert page.client is not None, "a curl example comes before any `diffutron serve` on its page"
    url, body, headers, i = None, None, {}, 1
    while i < len(argv):
        a = argv[i]
        if a in ("-d", "--data"):
            body, i = argv[i + 1], i + 2
        elif a in ("-H", "--header"):
            k, _, v = argv[i + 1].partition(":")
            headers[k.strip()] = v.strip()
            i += 2
        elif a in ("-N", "-s", "--no-buffer"):
            i += 1
        elif a.startswith("http"):
            url, i = a, i + 1
        else:
            raise AssertionError(f"curl option {a!r} is not understood by this test")
    path = "/" + url.split("://", 1)[1].split("/", 1)[1]
    client = page.client
    r = client.post(path, content=body, headers=headers) if body is not None else client.get(path)
    assert r.status_code == 200, f"curl {path}: HTTP {r.status_code}: {r.text[:300]}"
    if body is not None and json.loads(body).get("stream"):
        assert r.text.rstrip().endswith("data: [DONE]"), r.text[-300:]


def run_bash(block: Block, page: Page, monkeypatch) -> None:
    ran = 0
    for cmd, comment in commands(block.text):
        if "online" in comment.lower():
            continue
        for part in _split_and(shlex.split(cmd)):
            word = part[0]
            if word in ("diffutron", ".venv/bin/diffutron"):
                run_cli(part[1:], page, monkeypatch)
            elif word == "curl":
                run_curl(part, page)
            else:
                raise AssertionError(f"`{shlex.join(part)}` is not something this test can run: mark the block "
                                     "`<!-- not run: REASON -->` or the command `# online`")
            ran += 1
    assert ran, "nothing was run: mark the block `<!-- not run: REASON -->`"


def _split_and(tokens: list[str]) -> list[list[str]]:
    parts, cur = [], []
    for t in tokens:
        if t == "&&":
            parts.append(cur)
            cur = []
        else:
            cur.append(t)
    return [p for p in parts + [cur] if p]


# ---- python --------------------------------------------------------------------------------------

def run_python(block: Block, page: Page, monkeypatch) -> None:
    import openai

    real = openai.OpenAI

    def offline_client(*args, **kwargs):  # the page's served app answers the client
        assert page.client is not None, "an openai example comes before any `diffutron serve` on its page"
        kwargs["http_client"] = page.client
        return real(*args, **kwargs)

    monkeypatch.setattr(openai, "OpenAI", offline_client)
    code = block.text
    for pattern, tiny in TINY_PYTHON:
        code = pattern.sub(tiny, code)
    exec(compile(code, block.id, "exec"), page.namespace)


# ---- the user's files ----------------------------------------------------------------------------

def user_files(cwd: Path) -> None:
    from diffutron.lm import default_model_path
    from diffutron.tiny import SAMPLE_TEXTS

    paragraphs = [" ".join(SAMPLE_TEXTS[i:i + 3]) for i in range(0, len(SAMPLE_TEXTS), 3)]
    (cwd / "my_text.txt").write_text("\n".join(paragraphs * 2) + "\n", encoding="utf-8")
    (cwd / "corpus").mkdir()
    (cwd / "corpus" / "part-1.txt").write_text("\n".join(paragraphs * 8) + "\n", encoding="utf-8")
    def rows(items) -> str:
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in items)

    (cwd / "held_out.jsonl").write_text(rows({"text": p} for p in paragraphs), encoding="utf-8")
    (cwd / "prompts.jsonl").write_text(rows([{"prompt": "Merhaba!"}, {"prompt": "Çay nasıl demlenir?"},
                                             {"messages": [{"role": "user", "content": "Ankara nerede?"}]}]),
                                       encoding="utf-8")
    chats = [{"messages": [{"role": "user", "content": f"“{s.split()[0]}” ile bir cümle kur."},
                           {"role": "assistant", "content": s}]} for s in SAMPLE_TEXTS]
    (cwd / "chats.jsonl").write_text(rows(chats), encoding="utf-8")
    for name in ("recipes", "accelerate"):  # the examples run from the project's root
        (cwd / name).symlink_to(ROOT / name, target_is_directory=True)
    for name in ("DIR", "my-model", "DiffutronLM-0.3B-Instruct"):
        (cwd / name).symlink_to(Path(default_model_path()), target_is_directory=True)
    sys.path.insert(0, str(Path(__file__).parents[1] / "evaluation"))  # tests/evaluation/test_evaluation.py
    try:
        from test_evaluation import fixture_dir
    finally:
        sys.path.pop(0)
    fixture_dir(cwd / "cetvel_data", n=2)


PARAMS = runnable_pages()


@pytest.mark.parametrize("page,found", PARAMS, ids=[str(p.relative_to(ROOT)) for p, _ in PARAMS])
def test_every_example_of_the_page_runs_offline(page, found, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    user_files(tmp_path)
    state, failed = Page(tmp_path), []
    try:
        for block in found:
            if block.skip:
                continue
            try:
                (run_bash if RUN_LANGS[block.lang] == "bash" else run_python)(block, state, monkeypatch)
            except Exception as err:  # name every example that failed, not only the first
                failed.append(f"{block.id}: {type(err).__name__}: {str(err)[:500]}")
    finally:
        if state.client is not None:
            state.client.__exit__(None, None, None)
    assert not failed, "examples that do not run as pasted:\n" + "\n".join(failed)


def test_every_not_run_marker_gives_a_reason_and_sits_on_a_runnable_block():
    for page in PAGES:
        text = page.read_text(encoding="utf-8").splitlines()
        for n, line in enumerate(text):
            if "not run" in line and line.strip().startswith("<!--"):
                assert NOT_RUN.match(line.strip()), f"{page.name}:{n + 1}: write `<!-- not run: REASON -->`"
                nxt = text[n + 1].strip() if n + 1 < len(text) else ""
                assert RUN_LANGS.get(nxt.lstrip("`").lower()) and nxt.startswith("```"), \
                    f"{page.name}:{n + 1}: the marker must sit right above a ```bash or ```python fence"


def test_commands_split_like_a_shell():
    text = ("diffutron a --x 'it'\\''s' # note\n"
            "curl http://h/p -d '{\n  \"a\": 1 # not a comment\n}'\n"
            "diffutron b \\\n    --y 2   # online\n# only a comment\n")
    got = commands(text)
    assert got == [("diffutron a --x 'it'\\''s'", "note"),
                   ("curl http://h/p -d '{\n  \"a\": 1 # not a comment\n}'", ""),
                   ("diffutron b     --y 2", "online")]
    assert shlex.split(got[0][0])[-1] == "it's"
    assert shlex.split(got[1][0])[-1] == '{\n  "a": 1 # not a comment\n}'
    assert _split_and(["a", "b", "&&", "c"]) == [["a", "b"], ["c"]]
