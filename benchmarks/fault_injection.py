"""Fault injection (issue 25): hostile requests and crashes against the engine, its cache and a server on 127.0.0.1.

    HF_HUB_OFFLINE=1 python benchmarks/fault_injection.py [--no-server] [--json OUT] [--timeout-s 900]

Everything runs in a fresh temporary folder: one allowed root holding a tiny model, a folder outside it with
another, a cold cache. Parts:
1. admission: with ENGINE_ALLOWED_MODELS set to the root, hostile model requests through the engine's loader (the
   one the CLI and the app share), recording every file the process opens or lists meanwhile (an audit hook):
   refused in one line, nothing outside the root opened, no weight read for a model over the limit; the CLI once
   (exit 2); oversize CSVs.
2. the cache: kill -9 while a value's file is half written, after it is written but before its row is committed,
   and at a random moment of a write loop; kill -9 of real CLI runs while they write sweep rows, grid evaluations
   and an export; after each, every stored entry is read back (whole or absent) and the run repeated to
   completion (what is missing is recomputed). A truncated and a damaged entry; a full 1 MB tmpfs (in a private
   mount namespace, where the kernel allows one).
3. the server (unless --no-server): the dashboard on 127.0.0.1 with the same root: a session types an outside
   path and an oversize CSV (one line each, the session goes on); a session closes its socket right after a click
   while another clicks (the other settles); the server is killed -9 right after a click and restarted (the
   click settles again, no page shows an error).
Prints a Markdown table: the fault, what survived, and whether it held. Exit 0 when every row held, 1 otherwise.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

# A write loop that kills itself (kill -9) inside a cache write: "mid-file" half-way through a value's file,
# "before-commit" once the file is whole but before the row naming it is committed; "random" never (the parent
# kills it). Values of odd i are files (40 KB), even ones rows.
WRITER = r"""
import os, signal, sys
import diskcache, cache

mode, kill_at = sys.argv[1], int(sys.argv[2])
original = diskcache.Disk._write

def killed(self, full_path, iterator, file_mode, encoding=None):
    if mode == "mid-file":  # half the value's file on disk, then kill -9
        os.makedirs(os.path.dirname(full_path), exist_ok=True)
        data = b"".join(iterator)
        with open(full_path, file_mode) as writer:
            writer.write(data[: len(data) // 2])
    else:  # "before-commit": the whole file, killed before the row that names it is committed
        original(self, full_path, iterator, file_mode, encoding)
    os.kill(os.getpid(), signal.SIGKILL)

for i in range(100000):
    if i == kill_at:
        diskcache.Disk._write = killed
    cache.put(f"k{i}", {"i": i, "blob": bytes([i % 251]) * (40_000 if i % 2 else 100)})
    print(i, flush=True)
"""

# One export made whole, then a second one killed (kill -9) once its temporary folder is complete, just
# before the rename that would put it in place.
EXPORTER = r"""
import os, signal, sys
from engine.analysis.deploy import Exports
from engine.model.loading import load_model

model, tokenizer = load_model(sys.argv[1])
exports = Exports(sys.argv[2])
print(exports.folder(model, tokenizer, "fp32"), flush=True)

def killed(source, target):
    os.kill(os.getpid(), signal.SIGKILL)

os.rename = killed
exports.folder(model, tokenizer, "int8")
"""

# Fills the cache on a full file system: what was stored stays, the work goes on, one warning.
FILLER = r"""
import json, logging, os, sys
import cache
logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
cache.put("before", {"kept": True})
computed = [cache.remember(f"big{i}", lambda i=i: bytes([i]) * 300_000) == bytes([i]) * 300_000 for i in range(12)]
print(json.dumps({"computed": all(computed), "kept": cache.lookup("before"), "problem": cache.problem()}))
"""


def value(i: int) -> dict:
    return {"i": i, "blob": bytes([i % 251]) * (40_000 if i % 2 else 100)}


def full_tmpfs(folder: Path, script: str, env: dict, size: str = "1m") -> subprocess.CompletedProcess:
    """Run `script` with its cache folder on a `size` tmpfs mounted in a private mount namespace."""
    command = f'mount -t tmpfs -o size={size} tmpfs "{folder}" && exec "{sys.executable}" -c "$FILLER"'
    return subprocess.run(["unshare", "-rm", "sh", "-c", command], cwd=ROOT, env={**env, "FILLER": script},
                          capture_output=True, text=True, timeout=120)


ROWS: list[dict] = []


def row(part: str, fault: str, survived: str, held: bool, new: bool = False) -> None:
    ROWS.append({"part": part, "fault": fault + (" *" if new else ""), "survived": survived, "held": bool(held)})
    print(f"[{time.strftime('%H:%M:%S')}] {'ok  ' if held else 'FAIL'} {fault}: {survived}", file=sys.stderr,
          flush=True)


def short(text: str, limit: int = 110) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---- 1. admission ---------------------------------------------------------------------------------
OPENED: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if OPENED is not None and event in ("open", "os.listdir", "os.scandir") and args and args[0] is not None:
        OPENED.append(os.fsdecode(args[0]) if isinstance(args[0], (str, bytes, os.PathLike)) else str(args[0]))


def admission(base: Path) -> tuple[Path, Path]:
    global OPENED
    import torch
    import zoo

    from engine.data.sets import DataError, load_csv
    from engine.model import loading
    from engine.model.errors import ModelError

    root, outside = base / "models", base / "outside"
    root.mkdir()
    outside.mkdir()
    zoo.save("bert", root / "bert")
    zoo.save("bert", outside / "secret")
    os.environ["ENGINE_ALLOWED_MODELS"] = str(root)
    (root / "escape").symlink_to(outside / "secret")
    (root / "up").symlink_to("..")
    linked = root / "linked-config"
    linked.mkdir()
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (linked / name).write_bytes((root / "bert" / name).read_bytes())
    (linked / "config.json").symlink_to(outside / "secret" / "config.json")
    big = root / "claims-70b"
    big.mkdir()
    (big / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForSequenceClassification"], "model_type": "llama", "hidden_size": 8192,
        "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
        "vocab_size": 128256, "max_position_embeddings": 8192, "hidden_act": "silu"}))
    header = json.dumps({"score.weight": {"dtype": "F32", "shape": [2, 8192], "data_offsets": [0, 0]}}).encode()
    (big / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    pickled = root / "pickled"
    zoo.save("bert", pickled)
    from safetensors.torch import load_file

    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    broken = root / "broken-config"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "bert", "hidden_size": ')
    bad_header = root / "bad-header"
    bad_header.mkdir()
    (bad_header / "config.json").write_text((root / "bert" / "config.json").read_text())
    (bad_header / "model.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}")

    sys.addaudithook(_audit)
    weights_read: list[str] = []
    real_from_pretrained = loading.AutoModelForSequenceClassification.from_pretrained

    def recording(*args, **kwargs):
        weights_read.append(str(args[0]))
        return real_from_pretrained(*args, **kwargs)

    loading.AutoModelForSequenceClassification.from_pretrained = recording
    cases = [
        ("a folder outside the root", str(outside / "secret"), False),
        ("a path outside the root that does not exist", str(outside / "nothing-here"), True),
        ("a symlink in the root to a folder outside", str(root / "escape"), False),
        ("`..` out of the root", str(root / ".." / "outside" / "secret"), False),
        ("a symlink to the root's parent, then down", str(root / "up" / "outside" / "secret"), True),
        ("a folder whose config.json links outside", str(linked), True),
        ("`~` and `..` to /etc", "~/../../etc", True),
        ("a Hub id not allowed", "someorg/somemodel", False),
        ("a config claiming 70 B parameters", str(big), False),
        ("a pickle-only folder", str(pickled), False),
        ("a folder with a broken config.json", str(broken), False),
        ("a safetensors header claiming 1 TB", str(bad_header), True),
    ]
    for fault, name, new in cases:
        OPENED, weights_read[:] = [], []
        try:
            loading.load_model(name)
            outcome, one_line = "LOADED", False
        except ModelError as error:
            outcome, one_line = str(error), "\n" not in str(error)
        opened_outside = [p for p in OPENED if str(outside) in p]
        OPENED = None
        row("admission", fault, f"{short(outcome)} (files opened outside: {len(opened_outside)}, weights read: "
            f"{len(weights_read)})", one_line and not opened_outside and not weights_read, new)
    os.environ["ENGINE_ALLOW_PICKLE"] = "1"
    calls: list = []
    real_load = torch.load
    torch.load = lambda *a, **k: calls.append(k.get("weights_only")) or real_load(*a, **k)
    try:
        model, _ = loading.load_model(str(pickled))
        row("admission", "a pickle-only folder with ENGINE_ALLOW_PICKLE=1",
            f"loaded, torch.load weights_only={calls}", calls and all(calls) and model.config.num_labels == 2)
    finally:
        torch.load = real_load
        del os.environ["ENGINE_ALLOW_PICKLE"]
    model, _, warning = loading.load_model_or_fallback(str(outside / "secret"), any_error=True)
    row("admission", "the app's loader on an outside folder", f"shows embedded, one line: {short(warning, 80)}",
        model.name_or_path == "embedded" and "\n" not in warning)
    done = subprocess.run([sys.executable, "-m", "engine", "eval", "--model", str(outside / "secret"), "--json"],
                          cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=300)
    lines = done.stderr.strip().splitlines()
    row("admission", "the CLI on an outside folder", f"exit {done.returncode}, {len(lines)} line on stderr",
        done.returncode == 2 and len(lines) == 1 and not done.stdout)
    done = subprocess.run([sys.executable, "-m", "engine", "layers", "--model", str(root / "bert"), "--json"],
                          cwd=ROOT, env={**os.environ, "ENGINE_MAX_MODEL_BYTES": "1M"}, capture_output=True,
                          text=True, timeout=300)
    lines = done.stderr.strip().splitlines()
    row("admission", "the CLI with ENGINE_MAX_MODEL_BYTES=1M", f"exit {done.returncode}: {short(lines[-1], 90)}",
        done.returncode == 2 and len(lines) == 1 and "limit of" in lines[0])
    for fault, raw in (("a 21 MiB CSV", b"text,label\n" + b"x" * (21 * 1024**2)),
                       ("a CSV of 100,001 rows", b"text,label\n" + b"".join(b"s%d,positive\n" % i
                                                                              for i in range(100_001)))):
        try:
            load_csv("upload.csv", raw)
            outcome, held = "accepted", False
        except DataError as error:
            outcome, held = str(error), "\n" not in str(error)
        row("admission", fault, short(outcome), held)
    return root, outside


# ---- 2. the cache ------------------------------------------------------------------------------------
def read_back(folder: Path) -> tuple[int, int, int]:
    """(whole, absent, dropped) over every key the store at `folder` holds, read as after a restart."""
    import logging

    import cache

    os.environ["ENGINE_CACHE_DIR"] = str(folder)
    warnings: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("cache").addHandler(handler)
    try:
        keys = [r[0] for r in sqlite3.connect(folder / "cache.db").execute("SELECT key FROM Cache")]
        found = [cache.lookup(key, cache.MISSING) for key in keys]
    finally:
        logging.getLogger("cache").removeHandler(handler)
    dropped = sum("corrupt" in message for message in warnings)
    return sum(v is not cache.MISSING for v in found), sum(v is cache.MISSING for v in found), dropped


def writer_kills(base: Path) -> None:
    import cache

    for mode, new in (("mid-file", False), ("before-commit", True), ("random", False)):
        folder = base / f"cache-{mode}"
        child = subprocess.Popen([sys.executable, "-c", WRITER, mode, "41" if mode != "random" else "-1"], cwd=ROOT,
                                 env={**os.environ, "ENGINE_CACHE_DIR": str(folder)}, stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, text=True)
        done = []
        for line in child.stdout:
            done.append(int(line))
            if mode == "random" and len(done) >= 75:
                child.send_signal(signal.SIGKILL)
                break
        child.wait(60)
        os.environ["ENGINE_CACHE_DIR"] = str(folder)
        wrong = [key for key in [f"k{i}" for i in range(done[-1] + 2)]
                 if cache.lookup(key, cache.MISSING) not in (cache.MISSING, value(int(key[1:])))]
        lost = [i for i in done if cache.lookup(f"k{i}") != value(i)]
        whole, absent, dropped = read_back(folder)
        again = cache.remember(f"k{done[-1] + 1}", lambda: value(done[-1] + 1)) == value(done[-1] + 1)
        row("cache", f"kill -9 during a cache write ({mode})",
            f"{whole} entries whole, {absent} absent, {len(wrong)} wrong, {len(lost)} acknowledged lost; "
            f"the in-flight one recomputed", not wrong and not lost and not dropped and again, new)


def cli_kill(fault: str, command: list[str], folder: Path, ready, check) -> None:
    """Start a CLI run writing into the cache at `folder`, kill -9 it once `ready()` says it is writing, read
    every entry back, then run it again to completion."""
    env = {**os.environ, "ENGINE_CACHE_DIR": str(folder)}
    env.pop("ENGINE_ALLOWED_MODELS", None)
    child = subprocess.Popen([sys.executable, "-m", "engine", *command], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    while child.poll() is None and time.monotonic() < deadline and not ready():
        time.sleep(0.05)
    killed = child.poll() is None
    os.killpg(child.pid, signal.SIGKILL)
    child.wait(30)
    before = check(folder)
    again = subprocess.run([sys.executable, "-m", "engine", *command], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=900)
    after = check(folder)
    row("cache", fault, f"{'killed mid-run' if killed else 'run had ended'}: {before}; rerun exit {again.returncode}: "
        f"{after}", killed and again.returncode == 0 and "wrong 0" in before and "wrong 0" in after)


def rows_at_least(folder: Path, count: int):
    def ready() -> bool:
        try:
            with sqlite3.connect(f"file:{folder / 'cache.db'}?mode=ro", uri=True, timeout=0.2) as db:
                return db.execute("SELECT COUNT(*) FROM Cache").fetchone()[0] >= count
        except sqlite3.Error:
            return False
    return ready


def entries(folder: Path) -> str:
    if not (folder / "cache.db").exists():
        return "no store yet, wrong 0"
    whole, absent, dropped = read_back(folder)
    return f"{whole} whole, {absent} absent, wrong {dropped}"


def export_check(target: Path):
    def check(_folder: Path) -> str:
        from engine.analysis.deploy import Exports

        shown = target.exists()
        partial = [p for p in target.parent.iterdir() if ".partial-" in p.name]
        return (f"{'whole folder' if shown and Exports.whole(target) else 'no folder' if not shown else 'BROKEN'}, "
                f"{len(partial)} partial hidden, wrong {int(shown and not Exports.whole(target))}")
    return check


def cache_faults(base: Path, root: Path) -> None:
    import cache
    import onnxruntime as ort

    from engine.analysis.deploy import Exports

    writer_kills(base)
    sweep = base / "cache-sweep"
    cli_kill("kill -9 while a sweep writes its rows", ["sensitivity", "--precisions", "int8", "--limit", "48",
                                                       "--json"], sweep, rows_at_least(sweep, 3), entries)
    grid = base / "cache-grid"
    cli_kill("kill -9 while the grid writes evaluations",
             ["grid", "--models", "embedded", "--data", "embedded,amazon", "--plans", "fp32,int8,int4", "--limit",
              "96", "--backend", "local", "--json"], grid, rows_at_least(grid, 1), entries)
    out = base / "export-out" / "int8"
    out.parent.mkdir()
    writing = lambda: any(".partial-" in p.name and any(p.iterdir()) for p in out.parent.iterdir())
    cli_kill("kill -9 during `export` (its temporary folder, then a rename)",
             ["export", "--model", str(root / "bert"), "--plan", "int8", "--format", "onnx", "--out", str(out),
              "--json"], base / "cache-export", writing, export_check(out))
    exports_root = base / "exports"
    child = subprocess.run([sys.executable, "-c", EXPORTER, str(root / "bert"), str(exports_root)], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    whole = Path(child.stdout.strip())
    shown = [p for p in exports_root.iterdir() if not p.name.startswith(".")]
    partial = [p for p in exports_root.iterdir() if ".partial-" in p.name]
    exports = Exports(exports_root)
    exports.sweep(stale_s=0.0)
    from engine.model.loading import load_model

    model, tokenizer = load_model(str(root / "bert"))
    rebuilt = exports.folder(model, tokenizer, "int8")
    ort.InferenceSession(str(rebuilt / "model.onnx"), providers=["CPUExecutionProvider"])
    row("cache", "kill -9 during a cached export, its folder complete, before the rename",
        f"shown: {len(shown)} whole; {len(partial)} partial hidden, swept at restart; the missing export rebuilt",
        child.returncode == -signal.SIGKILL and shown == [whole] and Exports.whole(whole) and Exports.whole(rebuilt),
        True)
    onnx = whole / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[: onnx.stat().st_size // 3])
    again = exports.folder(model, tokenizer, "fp32")
    row("cache", "a truncated model.onnx in a cached export", "detected (size differs from its card), rebuilt",
        again == whole and Exports.whole(whole))

    folder = base / "cache-damaged"
    os.environ["ENGINE_CACHE_DIR"] = str(folder)
    cache.put("big", value(1))
    cache.put("small", value(2))
    for path in folder.rglob("*.val"):
        path.write_bytes(path.read_bytes()[:1000])
    with sqlite3.connect(folder / "cache.db") as db:
        (blob,) = db.execute("SELECT value FROM Cache WHERE key = 'small'").fetchone()
        db.execute("UPDATE Cache SET value = ? WHERE key = 'small'", (bytes(blob[:-7]) + b"garbage",))
    shown = [cache.lookup(key, "absent") for key in ("big", "small")]
    recomputed = [cache.remember(key, lambda: "recomputed") for key in ("big", "small")]
    row("cache", "a truncated value file and a damaged row", f"read as {shown}, then {recomputed}",
        shown == ["absent", "absent"] and recomputed == ["recomputed"] * 2)

    tiny = base / "tiny"
    tiny.mkdir()
    run = full_tmpfs(tiny, FILLER, {**os.environ, "ENGINE_CACHE_DIR": str(tiny / "cache")})
    if run.returncode != 0 or not run.stdout.strip():
        row("cache", "a full 1 MB tmpfs for the cache", f"not run: {short(run.stderr, 80)}", True)
    else:
        outcome = json.loads(run.stdout.strip().splitlines()[-1])
        warnings = [line for line in run.stderr.splitlines() if line.startswith("WARNING cache")]
        row("cache", "a full 1 MB tmpfs for the cache",
            f"12 results computed: {outcome['computed']}, stored before kept: {outcome['kept'] == {'kept': True}}, "
            f"{len(warnings)} warning, line: {short(outcome['problem'], 50)}",
            outcome["computed"] and outcome["kept"] == {"kept": True} and len(warnings) == 1)


# ---- 3. the server --------------------------------------------------------------------------------
def scheduler_faults() -> None:
    import threading

    from service import scheduler as sched

    queue = sched.Scheduler(workers=1, threads=1)
    failing = queue.submit("alice", "layer-map", lambda job: {}["missing"], label="Evaluating")
    served = queue.submit("bob", "layer-map", lambda job: 42)
    served.done_event.wait(10)
    row("server", "an exception inside one session's evaluation",
        f"alice sees: {failing.error}; bob's job: {served.result}",
        isinstance(failing.error, sched.JobFailed) and served.result == 42)
    sched.ORPHAN_S, sched.REAP_EVERY_S = 0.3, 0.05  # seconds here; 30 and 1 on a server
    queue, gate = sched.Scheduler(workers=1, threads=1), threading.Event()
    queue.submit("server", "evaluator", lambda job: gate.wait(10))
    holder: dict = {}
    thread = threading.Thread(target=lambda: holder.update(job=queue.submit("gone", "layer-map", lambda j: 1,
                                                                          tag="t")))
    thread.start()
    thread.join()
    time.sleep(0.6)
    gate.set()
    holder["job"].done_event.wait(10)
    row("server", "a session gone while its evaluation waits in the queue",
        f"its job: {holder['job'].error}", holder["job"].error is not None and holder["job"].started is None, True)


async def shows(session) -> str:
    """The one error or warning line the session's run ended with ("nothing" if none); the session goes on."""
    from streamlit_socket import PageError

    try:
        await session.idle(300)
        return "nothing"
    except PageError as error:
        return str(error)
    finally:
        session.trouble = None


async def server_faults(base: Path, root: Path, outside: Path) -> None:
    from load_test import SocketClient, start_server, stop_server

    os.environ["ENGINE_MAX_CSV_ROWS"] = "50"
    small = base / "rows.csv"
    small.write_text("text,label\n" + "".join(f"sentence {i},positive\n" for i in range(60)))
    log = open(base / "server.log", "w")
    server, url = start_server(base / "server-cache", log)
    try:
        one = SocketClient(url)
        await one.open(url, "embedded", "embedded")
        session = one.session
        await session.set_widget("sidebar_model", string_value="other…")
        await session.idle()
        await session.set_widget("sidebar_model_typed", string_value=str(outside / "secret"))
        shown = await shows(session)
        row("server", "a session types a folder outside the root", short(shown, 100),
            "is not allowed here" in shown and "showing the embedded model" in shown)
        await session.set_widget("sidebar_model", string_value="embedded")
        await session.idle()
        await session.upload("sidebar_upload", small)
        shown = await shows(session)
        row("server", "a session uploads a CSV over the row limit (50 for this run)", short(shown, 100),
            "more than 50 rows" in shown)
        await one.close()

        gone, other = SocketClient(url), SocketClient(url)
        await gone.open(url, "embedded", "embedded")
        await other.open(url, "embedded", "embedded")
        await gone.session.click_cell("lm_grid", 3)
        await gone.close()  # the browser closed mid-run
        start, _, settled = await other.click_and_settle(5, 2)
        row("server", "a browser closed right after its click, another session clicks",
            f"the other settled in {settled - start:.1f} s", True)
        await other.session.click_cell("lm_grid", 7)
        await asyncio.sleep(0.5)
        other.session.reader.add_done_callback(lambda task: task.cancelled() or task.exception())  # the kill ends it
        os.killpg(server.pid, signal.SIGKILL)  # mid-evaluation, with cache writes under way
        server.wait(30)
        server, url = start_server(base / "server-cache", log)
        back = SocketClient(url)
        await back.open(url, "embedded", "embedded")
        start, _, settled = await back.click_and_settle(7, 2)
        await back.session.idle()
        row("server", "kill -9 of the server right after a click, then a restart",
            f"the same click settled in {settled - start:.1f} s, no page error", True)
        await back.close()
    finally:
        stop_server(server)
        log.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-server", action="store_true", help="skip part 3 (the Streamlit server)")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here too")
    parser.add_argument("--timeout-s", type=float, default=1200, help="stop the whole run after this long")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(TimeoutError("the run took too long")))
    signal.alarm(int(args.timeout_s))
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fault-injection-") as scratch:
        base = Path(scratch)
        try:
            root, outside = admission(base)
            cache_faults(base, root)
            scheduler_faults()
            if not args.no_server:
                os.environ["ENGINE_ALLOWED_MODELS"] = str(root)
                asyncio.run(server_faults(base, root, outside))
        except Exception as error:  # a fault that was not survived: the table says so
            row("run", "the run itself", f"stopped: {type(error).__name__}: {short(error, 150)}", False)
    print(f"Fault injection, {time.strftime('%Y-%m-%d')}, {time.monotonic() - started:.0f} s; * = a case not "
          "named in the issue\n")
    print("| part | fault | what survived | held |\n|---|---|---|---|")
    for entry in ROWS:
        print(f"| {entry['part']} | {entry['fault']} | {entry['survived'].replace('|', '/')} | "
              f"{'yes' if entry['held'] else '**no**'} |")
    if args.json:
        args.json.write_text(json.dumps(ROWS, indent=1))
    return 0 if ROWS and all(entry["held"] for entry in ROWS) else 1


if __name__ == "__main__":
    sys.exit(main())
