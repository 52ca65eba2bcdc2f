"""Hostile inputs: a corpus of bad files and manifest lines, generated here (docs/RELIABILITY.md § 1).

Every case ends in exactly one of ``samples`` / ``failures``: a failure row with a precise
``[stage/reason]`` message, or — where the input is valid (greyscale, palette, alpha,
16-bit, CMYK, EXIF-rotated, 1×1, large, a symlink inside the root) — audited correctly.
Nothing else is affected and the counts reconcile with the manifest.

Fast tests check the loaders and the plan case by case; one slow test runs the whole
corpus through the real audit flow (Prefect + Ray + the tiny model) at once.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffcam.core.settings import CamSettings
from diffcam.storage.datasets import load_dataset
from diffcam.storage.images import SampleError, load_image, load_mask
from diffcam.storage.manifest import MAX_PROMPT_CHARS
from diffcam.storage.samples import LINE_PROBLEM_KINDS, ManifestError
from diffcam.storage.synthetic_writer import write_synthetic_dataset
from diffcam.tasks.plan import plan_shards
from tests.test_faults import VOLATILE

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@dataclass(frozen=True)
class Expect:
    """What must become of one manifest line: ``audited`` (a samples row) or a failure row
    whose message starts with ``reason`` (``[stage/kind]``) in ``stage``."""

    outcome: str  # "audited" | "failed"
    stage: str | None = None
    reason: str | None = None
    what: str = ""


# ----------------------------------------------------------------------------- file builders


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(width: int, height: int) -> bytes:
    """A valid-looking PNG header declaring width×height RGB pixels, with almost no data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _png_chunk(b"IEND", b""))


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    im.save(b, fmt, **kw)
    return b.getvalue()


def image_files(base: Image.Image) -> dict[str, tuple[bytes, Expect]]:
    """name → (file bytes, expectation) for every image-content case of the corpus."""
    png = _encode(base, "PNG")
    jpg = _encode(base, "JPEG", quality=95)
    crc = bytearray(png)
    crc[60] ^= 0xFF  # inside the IDAT data: zlib / CRC error
    bad_entropy = bytearray(jpg)
    for k in range(len(jpg) // 2, len(jpg) // 2 + 64):
        bad_entropy[k] = 0x55
    grey = base.convert("L")
    grey16 = Image.fromarray(np.asarray(grey).astype(np.uint16) * 257)  # mode I;16, same picture
    frames = [base, base.rotate(90)]
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90° clockwise
    wide = base.resize((base.width, base.height // 2))
    huge = base.resize((2400, 2400), Image.NEAREST)
    ok = Expect("audited")
    return {
        "zero.png": (b"", Expect("failed", "load", "[load/empty]", "zero-byte file")),
        "trunc.png": (png[: len(png) // 2], Expect("failed", "load", "[load/truncated]", "truncated PNG")),
        "trunc.jpg": (jpg[: len(jpg) // 2], Expect("failed", "load", "[load/truncated]", "truncated JPEG")),
        "crc.png": (bytes(crc), Expect("failed", "load", "[load/corrupt]", "corrupt PNG (zlib/CRC)")),
        "entropy.jpg": (bytes(bad_entropy), Expect("audited", what="JPEG with damaged entropy data: "
                                                   "decodes with artefacts, undetectable")),
        "text.jpg": (b"this is a text file, not a JPEG\n", Expect("failed", "load", "[load/not-an-image]",
                                                                  "text file named .jpg")),
        "bomb.png": (png_bomb(100_000, 100_000), Expect("failed", "load", "[load/too-large]",
                                                        "decompression bomb: 100000x100000 declared")),
        "over.png": (png_bomb(8000, 7000), Expect("failed", "load", "[load/too-large]",
                                                  "8000x7000 declared: over max_pixels, under Pillow's own limit")),
        "palette.png": (_encode(base.convert("P"), "PNG"), ok),
        "palette_tr.png": (_encode(base.convert("P"), "PNG", transparency=0), ok),
        "rgba.png": (_encode(base.convert("RGBA"), "PNG"), ok),
        "la.png": (_encode(grey.convert("LA"), "PNG"), ok),
        "grey.png": (_encode(grey, "PNG"), ok),
        "grey16.png": (_encode(grey16, "PNG"), Expect("audited", what="16-bit greyscale: scaled, not clipped")),
        "bilevel.png": (_encode(base.convert("1"), "PNG"), ok),
        "cmyk.jpg": (_encode(base.convert("CMYK"), "JPEG"), ok),
        "float.tif": (_encode(Image.fromarray(np.asarray(grey, dtype=np.float32) / 255), "TIFF"),
                      Expect("failed", "load", "[load/unsupported-mode]", "32-bit float TIFF")),
        "anim.gif": (_encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
                     Expect("failed", "load", "[load/animated]", "animated GIF (2 frames)")),
        "still.gif": (_encode(base, "GIF"), ok),
        "exif.jpg": (_encode(wide, "JPEG", exif=exif), Expect("audited", what="EXIF orientation 6: rotated")),
        "tiny.png": (_encode(Image.new("RGB", (1, 1), (200, 30, 30)), "PNG"), Expect("audited", what="1x1")),
        "huge.png": (_encode(huge, "PNG"), Expect("audited", what="2400x2400 (5.8 Mpx)")),
        "aspect.png": (_encode(Image.new("RGB", (10, 200), (0, 200, 0)), "PNG"),
                       Expect("failed", "generate", "[generate/image-aspect]", "10x200: beyond the vision table")),
    }


def _mask(path: Path, array: np.ndarray, mode: str | None = None) -> str:
    Image.fromarray(array, mode=mode).save(path)
    return path.name


def build_corpus(parent: Path) -> tuple[Path, dict[str, Expect]]:
    """A dataset folder with two clean synthetic samples and every hostile case; returns
    (root, {failure/sample key: Expect}). Keys of lines without a usable id are ``line:<n>``."""
    root = write_synthetic_dataset(parent / "corpus", 2, 0)
    outside = parent / "outside"
    outside.mkdir()
    good = [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]
    base = Image.open(root / good[0]["image"]).convert("RGB")
    prompt = good[0]["prompt"]
    lines: list[str] = []
    expect: dict[str, Expect] = {}

    def add(key: str | None, row: dict | str | bytes, exp: Expect) -> None:
        text = row if isinstance(row, str) else None
        if isinstance(row, dict):
            text = json.dumps(row)
        lines.append(text if text is not None else row)  # type: ignore[arg-type]
        expect[key if key is not None else f"line:{len(lines)}"] = exp

    for g in good:
        add(g["sample_id"], g, Expect("audited", what="clean synthetic sample"))

    (root / "bad").mkdir()
    for name, (data, exp) in image_files(base).items():
        (root / "bad" / name).write_bytes(data)
        add(f"img-{name}", {"sample_id": f"img-{name}", "image": f"bad/{name}", "prompt": prompt}, exp)

    # files that are not what they claim, or cannot be read
    add("missing", {"sample_id": "missing", "image": "bad/nope.png", "prompt": prompt},
        Expect("failed", "load", "[load/missing]", "missing file"))
    (root / "bad" / "dir.png").mkdir()
    add("folder", {"sample_id": "folder", "image": "bad/dir.png", "prompt": prompt},
        Expect("failed", "load", "[load/not-a-file]", "a folder named .png"))
    os.mkfifo(root / "bad" / "fifo.png")
    add("fifo", {"sample_id": "fifo", "image": "bad/fifo.png", "prompt": prompt},
        Expect("failed", "load", "[load/not-a-file]", "a FIFO named .png (opening it would block)"))
    locked = root / "bad" / "locked.png"
    locked.write_bytes(_encode(base, "PNG"))
    locked.chmod(0)
    add("locked", {"sample_id": "locked", "image": "bad/locked.png", "prompt": prompt},
        Expect("audited", what="mode 000: root reads it anyway") if IS_ROOT else
        Expect("failed", "load", "[load/permission-denied]", "mode 000"))

    # paths
    (outside / "secret.png").write_bytes(_encode(base, "PNG"))
    (root / "bad" / "escape.png").symlink_to(outside / "secret.png")
    (root / "bad" / "outdir").symlink_to(outside)
    (root / "bad" / "inside.png").symlink_to(root / good[0]["image"])
    unsafe = Expect("failed", "load", "[load/unsafe-path]")
    add("dotdot", {"sample_id": "dotdot", "image": "../outside/secret.png", "prompt": prompt}, unsafe)
    add("absolute", {"sample_id": "absolute", "image": str(outside / "secret.png"), "prompt": prompt}, unsafe)
    add("link-out", {"sample_id": "link-out", "image": "bad/escape.png", "prompt": prompt}, unsafe)
    add("dirlink-out", {"sample_id": "dirlink-out", "image": "bad/outdir/secret.png", "prompt": prompt}, unsafe)
    add("mask-out", {"sample_id": "mask-out", "image": good[0]["image"], "prompt": prompt,
                     "objects": [{"word": "red", "mask": "../outside/secret.png"}]}, unsafe)
    add("nul", {"sample_id": "nul", "image": "bad/x\u0000.png", "prompt": prompt}, unsafe)
    add("link-in", {"sample_id": "link-in", "image": "bad/inside.png", "prompt": prompt},
        Expect("audited", what="symlink that stays inside the root"))

    # ids and lines
    add("dup", {"sample_id": "dup", "image": good[0]["image"], "prompt": prompt},
        Expect("audited", what="first line of a duplicated id keeps it"))
    add(None, {"sample_id": "dup", "image": good[1]["image"], "prompt": prompt},
        Expect("failed", "load", "[load/duplicate-id]", "duplicate sample_id"))
    add(None, "{this is not json", Expect("failed", "load", "[load/malformed-line]", "malformed JSON line"))
    add(None, "[1, 2, 3]", Expect("failed", "load", "[load/malformed-line]", "JSON line that is not an object"))
    add(None, {"sample_id": "", "image": good[0]["image"], "prompt": prompt},
        Expect("failed", "load", "[load/bad-id]", "empty sample_id"))
    add(None, {"sample_id": "x" * 300, "image": good[0]["image"], "prompt": prompt},
        Expect("failed", "load", "[load/bad-id]", "overlong sample_id"))
    add(None, {"sample_id": "bell\u0007", "image": good[0]["image"], "prompt": prompt},
        Expect("failed", "load", "[load/bad-id]", "control character in sample_id"))
    add(None, {"sample_id": "line:1", "image": good[0]["image"], "prompt": prompt},
        Expect("failed", "load", "[load/bad-id]", "reserved line:<n> form"))
    add(None, {"image": good[0]["image"], "prompt": prompt},
        Expect("failed", "load", "[load/bad-id]", "no sample_id"))

    # prompts
    add("p-empty", {"sample_id": "p-empty", "image": good[0]["image"], "prompt": "   "},
        Expect("failed", "load", "[load/bad-prompt]", "blank prompt"))
    add("p-none", {"sample_id": "p-none", "image": good[0]["image"]},
        Expect("failed", "load", "[load/missing-field]", "no prompt"))
    add("p-overlong", {"sample_id": "p-overlong", "image": good[0]["image"], "prompt": "a" * (MAX_PROMPT_CHARS + 1)},
        Expect("failed", "load", "[load/prompt-too-long]", f"{MAX_PROMPT_CHARS + 1} characters"))
    add("p-context", {"sample_id": "p-context", "image": good[0]["image"], "prompt": " ".join(["a"] * 480)},
        Expect("failed", "generate", "[generate/input-too-long]", "480 words: fits the manifest, not the model"))
    add("p-surrogate", {"sample_id": "p-surrogate", "image": good[0]["image"], "prompt": "bad \ud800 text"},
        Expect("failed", "load", "[load/bad-encoding]", "lone surrogate from a JSON escape"))
    raw = json.dumps({"sample_id": "p-bytes", "image": good[0]["image"], "prompt": "PLACEHOLDER"}).encode()
    add("p-bytes", raw.replace(b"PLACEHOLDER", b"caf\xe9 \xff"),  # Latin-1 bytes: not UTF-8
        Expect("failed", "load", "[load/bad-encoding]", "non-UTF-8 bytes in the prompt"))
    add("p-nul", {"sample_id": "p-nul", "image": good[0]["image"], "prompt": "describe\u0000 the image"},
        Expect("failed", "load", "[load/bad-prompt]", "NUL in the prompt"))
    add("p-unicode", {"sample_id": "p-unicode", "image": good[0]["image"], "prompt": "décrivez l'image ✓ 图像"},
        Expect("audited", what="non-ASCII UTF-8 prompt (unknown words: the tokenizer's <unk>)"))

    # masks
    h, w = base.height, base.width
    m = np.zeros((h, w), np.uint8)
    m[4:20, 4:20] = 255
    (root / "badmasks").mkdir()
    mk = root / "badmasks"
    cases = {
        "m-size": (_mask(mk / "size.png", np.zeros((h // 2, w), np.uint8) + 255), "[mask/size-mismatch]"),
        "m-labels": (_mask(mk / "labels.png", (m > 0).astype(np.uint8) * np.uint8(3) + (m == 0) * np.uint8(1)),
                     "[mask/unknown-labels]"),
        "m-aa": (_mask(mk / "aa.png", np.where(m > 0, 255, 0).astype(np.uint8) // 2 + 64), "[mask/unknown-labels]"),
        "m-empty": (_mask(mk / "empty.png", np.zeros((h, w), np.uint8)), "[mask/empty-mask]"),
        "m-text": ("text.jpg", "[mask/not-an-image]"),
    }
    shutil.copy(root / "bad" / "text.jpg", mk / "text.jpg")
    for sid, (name, reason) in cases.items():
        add(sid, {"sample_id": sid, "image": good[0]["image"], "prompt": prompt,
                  "objects": [{"word": "green", "mask": f"badmasks/{name}"}]}, Expect("failed", "load", reason))
    add("m-01", {"sample_id": "m-01", "image": good[0]["image"], "prompt": prompt,
                 "objects": [{"word": "green", "mask": f"badmasks/{_mask(mk / 'zero_one.png', (m > 0).astype(np.uint8))}"}]},
        Expect("audited", what="0/1 mask: binary, accepted"))
    add("m-missing", {"sample_id": "m-missing", "image": good[0]["image"], "prompt": prompt,
                      "objects": [{"word": "green", "mask": "badmasks/gone.png"}]},
        Expect("failed", "load", "[load/missing]", "mask file missing"))
    add("o-word", {"sample_id": "o-word", "image": good[0]["image"], "prompt": prompt,
                   "objects": [{"word": "two words", "mask": "badmasks/zero_one.png"}]},
        Expect("failed", "load", "[load/bad-objects]", "object word with a space"))
    add("o-type", {"sample_id": "o-type", "image": good[0]["image"], "prompt": prompt, "objects": "mask.png"},
        Expect("failed", "load", "[load/bad-objects]", "objects is not a list"))

    data = b"\n".join(x if isinstance(x, bytes) else x.encode("utf-8") for x in lines) + b"\n"
    (root / "manifest.jsonl").write_bytes(data)
    return root, expect


# ----------------------------------------------------------------------------- fast: loaders


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, Expect]]:
    return build_corpus(tmp_path_factory.mktemp("hostile"))


def test_every_image_case_loads_or_fails_with_its_reason(corpus):
    root, expect = corpus
    grey8 = None
    for name in image_files(Image.new("RGB", (4, 4))):
        exp = expect[f"img-{name}"]
        path = root / "bad" / name
        if exp.outcome == "audited" or exp.stage != "load":
            im = load_image(path)
            assert im.mode == "RGB", name
            if name == "grey.png":
                grey8 = np.asarray(im)
            continue
        with pytest.raises(SampleError) as ei:
            load_image(path)
        assert str(ei.value).startswith(exp.reason), (name, str(ei.value))
    # 16-bit greyscale is the same picture as the 8-bit one (Pillow's own conversion clips it to white)
    assert np.array_equal(np.asarray(load_image(root / "bad" / "grey16.png")), grey8)
    assert load_image(root / "bad" / "exif.jpg").size == (32, 64)  # stored 64x32, orientation 6
    assert load_image(root / "bad" / "tiny.png").size == (1, 1)


#: An unprivileged account for the permission test when the suite runs as root (CI does):
#: nobody/nogroup on Debian-like systems.
UNPRIVILEGED_UID = UNPRIVILEGED_GID = 65534


def _load_images_unprivileged(folder: Path, names: tuple[str, ...], timeout_s: float = 60.0) -> dict[str, str]:
    """`load_image` on each ``folder/<name>`` in a forked child that has switched to an
    unprivileged user: "loaded", or the `SampleError` message. The suite runs as root in CI,
    and root reads mode-000 files. A fork, not a new interpreter: the child needs nothing it
    has not already imported (here the Python executable lives under /root, which the
    unprivileged user cannot open). Skips, saying why, where the switch is refused."""
    import select
    import signal

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.close(r)
            out: dict[str, str] = {}
            try:
                os.setgroups([])
                os.setgid(UNPRIVILEGED_GID)
                os.setuid(UNPRIVILEGED_UID)
            except OSError as e:
                out["setuid"] = f"{type(e).__name__}: {e}"
            else:
                for name in names:
                    try:
                        load_image(folder / name)
                        out[name] = "loaded"
                    except SampleError as e:
                        out[name] = str(e)
                    except Exception as e:  # noqa: BLE001 - reported to the parent, which fails
                        out[name] = f"{type(e).__name__}: {e}"
            data = json.dumps(out).encode()
            while data:
                data = data[os.write(w, data):]
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    try:
        ready, _, _ = select.select([r], [], [], timeout_s)
        if not ready:
            os.kill(pid, signal.SIGKILL)
            pytest.fail(f"the unprivileged child gave no answer in {timeout_s} s")
        chunks = []
        while chunk := os.read(r, 65536):
            chunks.append(chunk)
    finally:
        os.close(r)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, status
    result = json.loads(b"".join(chunks))
    if "setuid" in result:  # no CAP_SETUID / CAP_SETGID (e.g. a restricted container)
        pytest.skip(f"running as root without the right to switch to uid {UNPRIVILEGED_UID}: {result['setuid']}")
    return result


def test_unreadable_permissions(tmp_path):
    """A mode-000 image is a ``[load/permission-denied]`` failure. As root (CI), the check runs
    in a child switched to an unprivileged user, beside a readable image in the same folder:
    that one loads, so the folder was reachable and only the file's mode refused."""
    if not IS_ROOT:
        p = tmp_path / "locked.png"
        Image.new("RGB", (4, 4)).save(p)
        p.chmod(0)
        with pytest.raises(SampleError, match=r"^\[load/permission-denied\]"):
            load_image(p)
        return
    import tempfile

    # pytest's tmp_path lies under mode-0700 folders that the unprivileged user cannot enter
    folder = Path(tempfile.mkdtemp(prefix="diffcam-perm-"))
    try:
        folder.chmod(0o755)
        for name, mode in (("open.png", 0o644), ("locked.png", 0)):
            Image.new("RGB", (4, 4)).save(folder / name)
            (folder / name).chmod(mode)
        result = _load_images_unprivileged(folder, ("open.png", "locked.png"))
    finally:
        shutil.rmtree(folder)
    assert result["open.png"] == "loaded", result
    assert result["locked.png"].startswith("[load/permission-denied]"), result


def test_permission_denied_maps_to_its_reason(tmp_path, monkeypatch):
    p = tmp_path / "locked.png"
    Image.new("RGB", (4, 4)).save(p)

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied", str(p))

    monkeypatch.setattr(Image, "open", denied)
    with pytest.raises(SampleError, match=r"^\[load/permission-denied\]"):
        load_image(p)


def test_mask_cases(tmp_path):
    m = np.zeros((6, 8), np.uint8)
    m[1:3, 2:5] = 255
    cases = {
        "ok.png": (m, None),
        "zero_one.png": ((m > 0).astype(np.uint8), None),
        "labels.png": ((m > 0).astype(np.uint8) * 2 + 1, "[mask/unknown-labels]"),
        "grey.png": (m // 2, "[mask/unknown-labels]"),
        "empty.png": (np.zeros_like(m), "[mask/empty-mask]"),
    }
    for name, (arr, reason) in cases.items():
        Image.fromarray(arr).save(tmp_path / name)
        if reason is None:
            assert np.array_equal(load_mask(tmp_path / name, (8, 6)), m > 0), name
        else:
            with pytest.raises(SampleError) as ei:
                load_mask(tmp_path / name, (8, 6))
            assert str(ei.value).startswith(reason), (name, str(ei.value))
    rgb = np.stack([m, np.zeros_like(m), np.zeros_like(m)], -1)  # a red colour-coded segmentation
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    with pytest.raises(SampleError, match="unknown-labels"):
        load_mask(tmp_path / "rgb.png", (8, 6))
    p3 = Image.fromarray((m > 0).astype(np.uint8) + np.eye(6, 8, dtype=np.uint8), mode="L").convert("P")
    p3.save(tmp_path / "p3.png")
    with pytest.raises(SampleError, match="unknown-labels"):
        load_mask(tmp_path / "p3.png", (8, 6))
    with pytest.raises(SampleError, match=r"^\[mask/size-mismatch\]"):
        load_mask(tmp_path / "ok.png", (6, 8))


# ----------------------------------------------------------------------------- fast: manifest + plan


def test_manifest_lines_become_failure_rows_and_counts_reconcile(corpus):
    """Every manifest line is planned: a worker item, or a failure row with its precise reason."""
    root, expect = corpus
    ds = load_dataset(root)
    n_lines = sum(1 for line in (root / "manifest.jsonl").read_bytes().split(b"\n") if line.strip())
    assert len(ds.samples) == n_lines == len(expect)
    shards = plan_shards(ds.samples, shard_size=8, root=ds.root)
    items = {it["sample_id"] for s in shards for it in s.items}
    failed = {f["sample_id"]: f for s in shards for f in s.failures}
    assert items.isdisjoint(failed) and len(items) + len(failed) == n_lines
    for key, exp in expect.items():
        kind = exp.reason[1:-1].split("/")[1] if exp.reason else None
        if exp.outcome == "failed" and kind in LINE_PROBLEM_KINDS:  # known before any file is opened
            assert key in failed, (key, exp.reason)
            assert failed[key]["message"].startswith(exp.reason), (key, failed[key]["message"])
        else:  # audited, or found when the worker opens the file / runs the model
            assert key in items, key
    # no rejected path is ever handed to a worker or hashed
    assert all(str(root.parent / "outside") not in it["image_path"] for s in shards for it in s.items)
    # a planned failure is a valid failures row
    from diffcam.storage.schemas import table_from_rows

    table_from_rows("failures", [{**f, "run_id": "r"} for f in failed.values()])


def test_csv_line_with_non_utf8_bytes_is_that_lines_failure(tmp_path):
    root = write_synthetic_dataset(tmp_path / "d", 2, 0)
    rows = [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]
    (root / "manifest.jsonl").unlink()
    body = "sample_id,image,prompt\n" + "".join(f"{r['sample_id']},{r['image']},{r['prompt']}\n" for r in rows)
    (root / "manifest.csv").write_bytes(body.encode() + b"latin,images/synth-000000.png,caf\xe9\n")
    ds = load_dataset(root)
    assert [(s.sample_id, s.problem_kind) for s in ds.samples] == [
        ("synth-000000", None), ("synth-000001", None), ("latin", "bad-encoding")]
    (root / "manifest.csv").write_bytes(b"\xff\xfe" + body.encode("utf-16-le"))
    with pytest.raises(ManifestError, match="UTF-16"):
        load_dataset(root)


def test_structurally_broken_manifests_are_refused_whole(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "manifest.jsonl").write_bytes(b"\x00" * 64)
    with pytest.raises(ManifestError, match="binary file"):
        load_dataset(d)
    (d / "manifest.jsonl").write_text("not json\n{also not}\n")
    with pytest.raises(ManifestError, match="no line is a usable sample") as ei:
        load_dataset(d)
    assert {p.line for p in ei.value.problems if p.line} == {1, 2}


# ----------------------------------------------------------------------------- slow: the whole corpus, one run


@pytest.mark.slow
def test_whole_corpus_through_the_audit_flow(prefect_harness, corpus, tmp_path):
    """One real audit over every case: it completes (status succeeded, GX passes), each case
    is where `Expect` says with its reason, the valid odd formats are audited, the clean
    samples' rows are exactly what a clean in-process audit gives, and counts reconcile."""
    from diffcam.flows.audit import audit
    from diffcam.flows.paths import DEFAULT_MODEL
    from diffcam.storage.schemas import table_from_rows
    from diffcam.storage.store import Store
    from diffcam.tasks.worker import CamWorker

    root, expect = corpus
    store = tmp_path / "store"
    summary = audit(model=str(DEFAULT_MODEL), dataset=str(root), store=str(store), run_id="hostile",
                    workers=2, cpus_per_worker=1, shard_size=16)
    assert summary["status"] == "succeeded", summary["validation_failed"]
    st = Store(store)
    samples = {r["sample_id"]: r for r in st.read_table("samples", "hostile").to_pylist()}
    failures = {r["sample_id"]: r for r in st.read_table("failures", "hostile").to_pylist()}
    maps = st.read_table("token_maps", "hostile").to_pylist()
    assert set(samples).isdisjoint(failures)
    assert summary["n_samples"] == len(expect) == len(samples) + len(failures)  # reconciles with the manifest
    outcome = {}
    for key, exp in expect.items():
        if exp.outcome == "audited":
            assert key in samples, (key, failures.get(key, {}).get("message"))
            outcome[key] = "audited"
        else:
            assert key in failures, (key, "was audited")
            f = failures[key]
            assert (f["stage"], f["message"][: len(exp.reason)]) == (exp.stage, exp.reason), (key, f["message"])
            outcome[key] = f"failed {exp.reason}"
    # the odd-but-valid formats were audited on the right pixels
    assert (samples["img-exif.jpg"]["width"], samples["img-exif.jpg"]["height"]) == (32, 64)
    assert (samples["img-huge.png"]["width"], samples["img-tiny.png"]["width"]) == (2400, 1)
    by_sample: dict[str, list] = {}
    for r in maps:
        by_sample.setdefault(r["sample_id"], []).append((r["word_index"], r["method"], r["map"]))
    assert samples["img-grey16.png"]["answer"] == samples["img-grey.png"]["answer"]
    assert sorted(by_sample["img-grey16.png"]) == sorted(by_sample["img-grey.png"])

    # nothing else affected: the clean samples' rows equal a clean audit of the same items
    ds = load_dataset(root)
    clean = [s for s in ds.samples if s.sample_id in ("synth-000000", "synth-000001")]
    items = [{**it, "run_id": "hostile", "shard_id": 0} for it in plan_shards(clean, root=ds.root)[0].items]
    cam = CamSettings.from_run_config(json.loads(st.read_run("hostile")["config_json"]))
    ref = CamWorker(str(DEFAULT_MODEL), cam, threads=1).process(items)
    volatile = VOLATILE["samples"]
    for r in ref:
        got = {k: v for k, v in samples[r["sample_id"]].items() if k not in volatile}
        stored = table_from_rows("samples", [r["samples"]]).to_pylist()[0]  # the tables' float32 columns
        want = {k: v for k, v in stored.items() if k not in volatile}
        assert got == want, r["sample_id"]
        assert sorted(by_sample[r["sample_id"]]) == sorted((m["word_index"], m["method"], m["map"])
                                                           for m in r["token_maps"])
    print("\nhostile corpus outcomes:\n" + "\n".join(f"  {k:<24} {v}" for k, v in outcome.items()))


def test_cli_lists_the_bad_lines_before_the_run(corpus, monkeypatch, tmp_path):
    """`diffcam audit` names every bad manifest line (they will be failure rows) and runs the rest."""
    from typer.testing import CliRunner

    import diffcam.flows.audit
    from diffcam.flows.cli import app

    root, expect = corpus
    seen = {}

    def fake_audit(**kw):
        seen.update(kw)
        return {"run_id": "x", "status": "succeeded", "n_results": 1, "n_failures": 1, "n_shards": 1,
                "shards_committed": [0], "shards_skipped": [], "run_dir": "d", "catalog": "c",
                "report_html": "r", "summary_md": "s", "validation_failed": []}

    monkeypatch.setattr(diffcam.flows.audit, "audit", fake_audit)
    res = CliRunner().invoke(app, ["audit", "--dataset", str(root), "--store", str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    assert seen["dataset"] == str(root)
    assert "manifest problem(s); these lines go to the failures table" in res.output
    assert "line 38: sample_id: duplicate 'dup' (first on line 37)" in res.output
