"""The consumers outside Python, run from Python for checks: ``export/cpp``'s ``prtool-embed`` (ONNX
Runtime and OpenVINO backends), ``export/web`` under Node and in headless Chromium (onnxruntime-web).

Each runner takes an export (``model.onnx`` with its ``model.json``) and image files and returns the
JSON document the consumer wrote: per image ``image_embeds`` and, when the export has them,
``kept_patch_indices``, ``logits`` and ``top5``. :class:`ConsumerRunner` makes any of them a runner
for :func:`prtool.export.validate.compare`. Chromium loads the page from a server on
127.0.0.1 (a module import from ``file://`` is blocked) and POSTs its document back to it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote

import numpy as np

from prtool.errors import PrtoolError
from prtool.export.io_names import EMBEDS, KEPT_INDICES, LOGITS, PIXELS

ROOT = Path(__file__).resolve().parents[2]
CPP_DIR = ROOT / "export" / "cpp"
WEB_DIR = ROOT / "export" / "web"
CPP_BINARY = CPP_DIR / "build" / "prtool-embed"
INSTALL = {
    "cpp": "apt-get install -y cmake g++ libpng-dev libjpeg-dev libssl-dev nlohmann-json3-dev",
    "node": "apt-get install -y nodejs npm (Node >= 18)",
    "chromium": "apt-get install -y chromium",
}
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-quic")


def missing_toolchains() -> dict[str, str]:
    """``{consumer: why it cannot run here, with the install command}`` for cpp, node and chromium."""
    missing = {}
    check = subprocess.run(["bash", str(CPP_DIR / "setup.sh"), "--check"], capture_output=True, text=True,
                           env={**os.environ, "PYTHON": sys.executable})
    if check.returncode != 0:
        missing["cpp"] = check.stderr.strip() or f"setup.sh --check failed; install with: {INSTALL['cpp']}"
    if not (shutil.which("node") and shutil.which("npm")):
        missing["node"] = f"node and npm are not on PATH; install with: {INSTALL['node']}"
    if not chromium_path():
        missing["chromium"] = f"chromium is not on PATH; install with: {INSTALL['chromium']}"
    return missing


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def run_tool(cmd: list[str], what: str, timeout: float, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run a consumer's command; a non-zero exit is a PrtoolError with the tail of its stderr."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env={**os.environ, "PYTHON": sys.executable})
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise PrtoolError(f"{what} failed (exit {proc.returncode}): {tail}")
    return proc


def build_cpp(timeout: float = 1200) -> Path:
    """Fetch the C++ dependencies and build ``prtool-embed`` (``export/cpp/setup.sh``); its path."""
    run_tool(["bash", str(CPP_DIR / "setup.sh")], "export/cpp/setup.sh", timeout)
    return CPP_BINARY


def install_web_modules(timeout: float = 600) -> None:
    """``npm ci`` in export/web (the locked onnxruntime-web, pngjs, @cwasm/jpeg-turbo) unless already there."""
    if not (WEB_DIR / "node_modules" / "onnxruntime-web" / "package.json").exists():
        run_tool(["npm", "ci", "--no-audit", "--no-fund"], "npm ci in export/web", timeout, cwd=WEB_DIR)


def _read_doc(cmd: list[str], what: str, out: Path, timeout: float) -> dict:
    run_tool(cmd + ["--out", str(out)], what, timeout)
    return json.loads(out.read_text())


def run_cpp(onnx: Path, images: list[Path], backend: str = "onnxruntime", batch: int = 8,
            dump_pixels: Path | None = None, timeout: float = 600) -> dict:
    """``prtool-embed`` on ``images`` with ``backend`` (onnxruntime or openvino)."""
    with tempfile.TemporaryDirectory(prefix="prtool-cpp-") as tmp:
        cmd = [str(CPP_BINARY), str(onnx), *map(str, images), "--backend", backend, "--batch", str(batch)]
        cmd += ["--dump-pixels", str(dump_pixels)] if dump_pixels else []
        return _read_doc(cmd, f"prtool-embed --backend {backend}", Path(tmp) / "out.json", timeout)


def run_node(onnx: Path, images: list[Path], batch: int = 8, dump_pixels: Path | None = None,
             timeout: float = 600) -> dict:
    """``export/web/embed-node.mjs`` (onnxruntime-web, WASM, one thread) on ``images``."""
    with tempfile.TemporaryDirectory(prefix="prtool-node-") as tmp:
        cmd = ["node", str(WEB_DIR / "embed-node.mjs"), str(onnx), *map(str, images), "--batch", str(batch)]
        cmd += ["--dump-pixels", str(dump_pixels)] if dump_pixels else []
        return _read_doc(cmd, "node embed-node.mjs", Path(tmp) / "out.json", timeout)


CONSUMERS = ("cpp-onnxruntime", "cpp-openvino", "node-ort-web", "chromium-ort-web")


def doc_outputs(doc: dict) -> dict[str, np.ndarray]:
    """A consumer's document as ``{output name: array [N, ...]}``, for the outputs it holds."""
    out = {}
    for name, dtype in ((EMBEDS, np.float32), (KEPT_INDICES, np.int64), (LOGITS, np.float32)):
        if doc["images"] and name in doc["images"][0]:
            out[name] = np.array([entry[name] for entry in doc["images"]], dtype=dtype)
    return out


def run_consumer(kind: str, onnx: Path, images: list[Path]) -> dict[str, np.ndarray]:
    """``kind`` (one of :data:`CONSUMERS`) on image files: its outputs, one row per image."""
    if kind.startswith("cpp-") and kind in CONSUMERS:
        doc = run_cpp(onnx, images, kind[4:])
    elif kind == "node-ort-web":
        doc = run_node(onnx, images)
    elif kind == "chromium-ort-web":
        doc = run_chromium(onnx, images)
    else:
        raise PrtoolError(f"unknown consumer {kind!r}: use one of {', '.join(CONSUMERS)}")
    return doc_outputs(doc)


class ConsumerRunner:
    """A consumer as a runner: ``infer({pixel_values: rows})`` runs it on the image files whose prtool
    preprocessing gave those rows (``pixels[i]`` is ``images[i]``'s), so batches, single samples and
    reversed batches all work. The consumer decodes and preprocesses the files itself: a difference in
    its preprocessing shows up as a difference in its outputs."""

    def __init__(self, kind: str, onnx: Path, images: list[Path], pixels):
        self.kind, self.onnx, self.images = kind, Path(onnx), [Path(p) for p in images]
        self.pixels = np.asarray(pixels, dtype=np.float32)
        if len(self.pixels) != len(self.images):
            raise PrtoolError(f"{len(self.images)} images but {len(self.pixels)} rows of pixels: "
                              "give one row per image")

    def _file(self, row: np.ndarray) -> Path:
        for image, pixels in zip(self.images, self.pixels):
            if np.array_equal(pixels, row):
                return image
        raise PrtoolError(f"the {self.kind} consumer runs on image files: feed rows of the pixels it was given")

    def infer(self, feeds: dict) -> dict[str, np.ndarray]:
        rows = np.asarray(feeds[PIXELS], dtype=np.float32)
        return run_consumer(self.kind, self.onnx, [self._file(r) for r in rows])


class _Handler(SimpleHTTPRequestHandler):
    """GET: /web/... from export/web, /files/... from the staged folder; POST /results: the page's document."""

    def __init__(self, *args, files: Path, inbox: dict, **kwargs):
        self.files, self.inbox = files, inbox
        super().__init__(*args, directory=str(WEB_DIR), **kwargs)

    def translate_path(self, path):
        if path.startswith("/files/"):
            return str(self.files / path[len("/files/"):].split("?")[0])
        return super().translate_path(path[len("/web"):] if path.startswith("/web/") else "/nonexistent")

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(204)
        self.end_headers()
        self.inbox["doc"] = json.loads(body or b"{}")
        self.inbox["event"].set()

    def log_message(self, *args):  # quiet
        pass


class PageServer:
    """The web page and staged files on 127.0.0.1 (a free port), for the life of a ``with`` block."""

    def __init__(self, onnx: Path, images: list[Path]):
        self._tmp = tempfile.TemporaryDirectory(prefix="prtool-web-")
        self.files = Path(self._tmp.name)
        for src, name in ((onnx, "model.onnx"), (onnx.with_suffix(".json"), "model.json")):
            os.symlink(Path(src).resolve(), self.files / name)
        (self.files / "images").mkdir()
        self.image_urls = []
        for i, p in enumerate(images):  # one folder per image: names may repeat, URLs end with the name
            (self.files / "images" / str(i)).mkdir()
            os.symlink(Path(p).resolve(), self.files / "images" / str(i) / Path(p).name)
            self.image_urls.append(f"/files/images/{i}/{quote(Path(p).name)}")
        self.inbox = {"event": threading.Event()}
        handler = partial(_Handler, files=self.files, inbox=self.inbox)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self._tmp.cleanup()

    def page_url(self, **params) -> str:
        query = "&".join(f"{k}={quote(str(v), safe='/')}" for k, v in {"model": "/files/model.onnx", **params}.items())
        return f"{self.base}/web/index.html?{query}"


def _chromium(args: list[str], profile: str) -> subprocess.Popen:
    return subprocess.Popen([chromium_path(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    """End Chromium and every helper process it started (its own session), and wait until none is left
    writing into the profile folder that is removed next."""
    import signal
    import time

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    deadline = time.monotonic() + 10
    try:
        while time.monotonic() < deadline:  # helpers that outlived the browser process, or a browser that hung
            os.killpg(proc.pid, signal.SIGKILL)
            proc.poll()  # reaps the browser process itself once it is gone
            time.sleep(0.05)
    except ProcessLookupError:
        pass
    proc.wait()


def run_chromium(onnx: Path, images: list[Path], batch: int = 8, timeout: float = 600) -> dict:
    """The page in headless Chromium on ``images``: the document it POSTs back."""
    with PageServer(onnx, images) as server, tempfile.TemporaryDirectory(prefix="prtool-chromium-") as profile:
        (server.files / "list.json").write_text(json.dumps({"images": server.image_urls, "batch": batch}))
        proc = _chromium([server.page_url(check="/files/list.json", post="/results")], profile)
        try:
            if not server.inbox["event"].wait(timeout):
                raise PrtoolError(f"the page posted no result within {timeout:.0f} s")
        finally:
            _stop(proc)
    doc = server.inbox["doc"]
    if "error" in doc:
        raise PrtoolError(f"the page failed: {doc['error']}")
    for entry, path in zip(doc["images"], images):
        entry["path"] = str(path)
    return doc


class _DevToolsPipe:
    """Chrome DevTools Protocol over --remote-debugging-pipe (Chromium reads fd 3, writes fd 4)."""

    def __init__(self, args: list[str], profile: str):
        to_chrome, self._send = os.pipe()
        self._recv, from_chrome = os.pipe()

        def wire():  # in the child, before exec: the pipe ends become fds 3 and 4
            os.dup2(to_chrome, 3)
            os.dup2(from_chrome, 4)

        self.proc = subprocess.Popen([chromium_path(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                                      "--remote-debugging-pipe", *args], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, preexec_fn=wire, close_fds=False,
                                     start_new_session=True)
        os.close(to_chrome)
        os.close(from_chrome)
        self._buf, self._id = b"", 0

    def call(self, method: str, session: str | None = None, **params) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params, **({"sessionId": session} if session else {})}
        os.write(self._send, json.dumps(msg).encode() + b"\0")
        while True:
            while b"\0" not in self._buf:
                chunk = os.read(self._recv, 1 << 20)
                if not chunk:
                    raise PrtoolError(f"chromium closed its DevTools pipe during {method}")
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise PrtoolError(f"DevTools {method}: {reply['error'].get('message')}")
                return reply["result"]

    def close(self):
        _stop(self.proc)
        os.close(self._send)
        os.close(self._recv)


def screenshot(onnx: Path, image: Path, out: Path, size: tuple[int, int] = (860, 520), timeout: float = 300) -> dict:
    """Writes a PNG of the page (headless Chromium, real clocks) once it has embedded ``image`` and shown the
    result; returns what the page reported showing (``top5`` class names or None, ``kept`` patch count)."""
    import base64

    with PageServer(onnx, [image]) as server, tempfile.TemporaryDirectory(prefix="prtool-chromium-") as profile:
        chrome = _DevToolsPipe([f"--window-size={size[0]},{size[1]}", "--hide-scrollbars",
                                server.page_url(image=server.image_urls[0], post="/results")], profile)
        try:
            if not server.inbox["event"].wait(timeout):
                raise PrtoolError(f"the page showed no result within {timeout:.0f} s")
            if "error" in server.inbox["doc"]:
                raise PrtoolError(f"the page failed: {server.inbox['doc']['error']}")
            page = next(t for t in chrome.call("Target.getTargets")["targetInfos"] if t["type"] == "page")
            session = chrome.call("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]
            chrome.call("Emulation.setDeviceMetricsOverride", session, width=size[0], height=size[1],
                        deviceScaleFactor=1, mobile=False)
            png = chrome.call("Page.captureScreenshot", session, format="png")["data"]
        finally:
            chrome.close()
    Path(out).write_bytes(base64.b64decode(png))
    return server.inbox["doc"]


def main(argv: list[str] | None = None) -> int:
    """``python -m prtool.deploy.consumers --screenshot export/web/screenshot.png``: the page with eval canvas 0
    and the testbed's pruned export with the shipped tokens and classifier head."""
    import argparse

    from PIL import Image

    ap = argparse.ArgumentParser(prog="python -m prtool.deploy.consumers", description=main.__doc__.split("\n")[0])
    ap.add_argument("--screenshot", type=Path, required=True, help="PNG to write")
    ap.add_argument("--image", type=int, default=0, help="testbed eval canvas to show")
    args = ap.parse_args(argv)
    from prtool.encoder.build import EncoderSpec, schedule_for
    from prtool.encoder.models import load_clip
    from prtool.export.onnx_export import ExportOptions, export_onnx
    from prtool.testbed import spec as tbspec
    from prtool.testbed.eval_set import load_eval_canvases
    from prtool.tuning.tune import export_extras

    try:
        loaded = load_clip("testbed")
        spec = EncoderSpec(schedule_for(loaded, "1:20,2:20,3:19,4:19"), "predictor", tbspec.PREDICTOR_PATH)
        extras = export_extras(loaded, spec, tbspec.TOKENS_PATH, True)
        with tempfile.TemporaryDirectory(prefix="prtool-shot-") as tmp:
            onnx = Path(tmp) / "model.onnx"
            export_onnx(loaded, spec, onnx, ExportOptions(with_kept_indices=True, validate=False),
                        visual_prompts=extras["visual_prompts"], extra_manifest=extras["manifest"],
                        class_embeds=extras["class_embeds"])
            canvases, _ = load_eval_canvases(limit=args.image + 1)
            image = Path(tmp) / f"eval_{args.image:03d}.png"
            Image.fromarray(canvases[args.image]).save(image)
            shown = screenshot(onnx, image, args.screenshot)
    except PrtoolError as exc:
        print(f"prtool: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"{args.screenshot}: top-5 {shown['top5']}, {shown['kept']} patches kept")
    return 0


if __name__ == "__main__":
    sys.exit(main())
