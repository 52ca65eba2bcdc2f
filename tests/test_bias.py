"""Bias audit on synthetic map sources with known answers (fast; no model).

Map sources stand in for a model: `cue_source` "looks at" pixels of the cue colour (the
Clever-Hans model of the planted-cue benchmark: its per-token map puts most mass on the
marker, its Diffusion-CAM map does not — the prototype's measured behaviour), `object_source`
looks at the named object only (a clean model), `centre_source` looks at the image centre
whatever the content.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from diffcam.core import inpaint
from diffcam.core.bias import clusters as bias_clusters
from diffcam.core.bias import dataset as bias_dataset
from diffcam.core.bias import flags as bias_flags
from diffcam.core.bias import sample as bias_sample
from diffcam.core.bias import windows as bias_windows
from diffcam.core.bias.dataset import WordSample
from diffcam.core.bias.flags import Flag
from diffcam.core.bias.settings import BiasSettings
from diffcam.core.bias.windows import cell_coverage
from diffcam.core.synthetic import CUE_COLORS, CueSpec, SynthSettings, answer_groundings, cue_region, make_samples

GRID = (8, 8)
PLACEMENTS = [
    ("circle", "top-left", "magenta"),
    ("square", "bottom-right", "cyan"),
]


def _samples(word: str, pos: str, color: str, n: int = 80, p: float = 0.9, seed: int = 3):
    ss = SynthSettings(cue=CueSpec(word=word, pos=pos, size=6, color=color, p=p))
    return ss, list(make_samples(n, seed, ss))


def object_source(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A clean map: the object's cells plus a little noise."""
    return cell_coverage(mask, GRID) + 0.03 * rng.random(GRID)


def cue_source(image: np.ndarray, mask: np.ndarray, rgb: tuple[int, int, int], rng: np.random.Generator,
               strength: float = 3.0) -> np.ndarray:
    """Object map plus `strength` × its mass on the pixels of colour `rgb` (if any)."""
    base = object_source(mask, rng)
    cue = cell_coverage(np.all(image == np.array(rgb, dtype=np.uint8), axis=-1), GRID)
    if cue.sum() > 0:
        base = base + strength * base.sum() * cue / cue.sum()
    return base


def _word_maps(samples, ss, planted: bool, seed: int = 0):
    """Per (sample, masked word): {token-gradnorm, diffusion-cam}; the cue source only on the cue word."""
    rng = np.random.default_rng(seed)
    out = []
    for i, s in enumerate(samples):
        all_masks = [o.mask for o in s.objects]
        for wi, (w, m) in enumerate(answer_groundings(s)):
            if m is None:
                continue
            if planted and w == ss.cue.word:
                tg = cue_source(s.image, m, ss.cue.rgb, rng)
            else:
                tg = object_source(m, rng)
            maps = {"token-gradnorm": tg, "diffusion-cam": object_source(m, rng)}
            out.append((f"s{i:03d}", wi, w, m, all_masks, maps, s.cue_present))
    return out


# --------------------------------------------------------------------------- helpers


def test_settings_roundtrip_and_validation() -> None:
    s = BiasSettings(off_object_threshold=0.3, sample_methods=("token-gradnorm",))
    d = s.model_dump(mode="json")
    assert json.loads(json.dumps(d)) == d
    assert BiasSettings.model_validate(d) == s
    with pytest.raises(ValueError, match="off_object_threshold"):
        BiasSettings(off_object_threshold=1.5)
    with pytest.raises(ValueError, match="unknown"):
        BiasSettings.model_validate({"nope": 1})


def test_flag_id_and_region_match_storage() -> None:
    from diffcam.storage.schemas import format_region, make_flag_id

    for args in [("off_object", "s1", 2, "circle", "token-gradnorm", None),
                 ("clever_hans", None, None, "circle", "diffusion-cam", "0.0000,0.0000,0.1250,0.1250")]:
        assert bias_flags.flag_id(*args) == make_flag_id(*args)
    assert bias_flags.format_region((0, 0.125, 0.25, 1)) == format_region(0, 0.125, 0.25, 1)


def test_cell_coverage_exact() -> None:
    m = np.zeros((64, 64), dtype=bool)
    m[0:8, 0:8] = True  # cell (0, 0)
    m[8:12, 8:16] = True  # half of cell (1, 1)
    cov = cell_coverage(m, GRID)
    assert cov[0, 0] == 1.0 and cov[1, 1] == 0.5 and cov.sum() == 1.5
    odd = np.ones((10, 7), dtype=bool)
    assert np.allclose(cell_coverage(odd, (3, 3)), 1.0)
    assert np.isclose(cell_coverage(m, (1, 1))[0, 0], m.mean())


def test_window_sums_brute_force() -> None:
    a = np.random.default_rng(0).random((6, 7))
    got = bias_windows.window_sums(a, (2, 3))
    want = np.array([[a[r:r + 2, c:c + 3].sum() for c in range(5)] for r in range(5)])
    assert np.allclose(got, want)
    assert bias_windows.window_cells((8, 8), 0.125) == (1, 1) and bias_windows.window_cells((24, 24), 0.125) == (3, 3)


# --------------------------------------------------------------------------- sample level


@pytest.mark.parametrize("word,pos,color", PLACEMENTS)
def test_off_object_flags_find_the_cue_samples(word: str, pos: str, color: str) -> None:
    ss, samples = _samples(word, pos, color)
    x0, y0, x1, y1 = cue_region(ss)
    rows = _word_maps(samples, ss, planted=True)
    flagged, truth = set(), set()
    for sid, wi, w, m, all_masks, maps, cue in rows:
        fl = bias_sample.sample_flags(maps, m, None, sample_id=sid, word_index=wi, word=w, all_masks=all_masks)
        if cue:
            truth.add(sid)
        for f in fl:
            ev = f.evidence
            assert f.method == "token-gradnorm"  # the channel-pooled stand-in never looks at the cue
            assert f.kind in ("off_object", "border_hotspot")
            rx0, ry0, rx1, ry1 = f.region
            assert rx0 * 64 <= x0 and x1 <= rx1 * 64 and ry0 * 64 <= y0 and y1 <= ry1 * 64  # region holds the cue
            assert f.score >= f.threshold and ev["sample_id"] == sid and ev["word"] == word
            if f.kind == "off_object":
                flagged.add(sid)
                assert ev["hotspot_share"] >= ev["inside_share"]
            else:
                assert ev["corner"] is True
    assert truth and flagged == truth


def test_clean_maps_raise_no_sample_flag() -> None:
    ss, samples = _samples("circle", "top-left", "magenta")
    for sid, wi, w, m, all_masks, maps, _ in _word_maps(samples, ss, planted=False):
        assert bias_sample.sample_flags(maps, m, None, sample_id=sid, word_index=wi, word=w, all_masks=all_masks) == []


def test_hotspot_on_another_object_is_not_off_object() -> None:
    """Attention on a second object is a grounding error, not a spurious background cue."""
    own = np.zeros((64, 64), dtype=bool)
    own[40:56, 40:56] = True
    other = np.zeros((64, 64), dtype=bool)
    other[0:8, 0:8] = True
    m = cell_coverage(other, GRID) * 5 + cell_coverage(own, GRID)
    kw = dict(sample_id="s", word_index=0, word="w")
    assert bias_sample.sample_flags({"token-gradnorm": m}, own, None, all_masks=[own, other], **kw) == []
    only_own = bias_sample.sample_flags({"token-gradnorm": m}, own, None, **kw)  # without all_masks it is off-object
    assert {f.kind for f in only_own} >= {"off_object"}


def test_zero_and_flat_maps() -> None:
    kw = dict(sample_id="s", word_index=1, word="red", all_masks=())
    mask = np.zeros((64, 64), dtype=bool)
    mask[:16, :16] = True
    z = bias_sample.sample_flags({"diffusion-cam": np.zeros(GRID)}, mask, None, **kw)
    assert [f.kind for f in z] == ["zero_map"] and z[0].score == 0.0
    f = bias_sample.sample_flags({"diffusion-cam": np.full(GRID, 0.7)}, mask, None, **kw)
    assert [x.kind for x in f] == ["flat_map"] and f[0].score == 0.0
    assert bias_sample.sample_flags({"gradcam": np.zeros(GRID)}, mask, None, **kw) == []  # not an audited method


def test_flag_rows_fit_the_flags_table_and_carry_evidence() -> None:
    """`diffcam.storage.schemas.flag_row` turns typed flags into ``flags`` rows; reading them back
    (`parse_region`, `parse_evidence`) gives the values again."""
    from diffcam.core.stats import map_stats
    from diffcam.storage.schemas import flag_row, parse_evidence, parse_region, table_from_rows

    ss, samples = _samples("circle", "top-left", "magenta", n=30)
    flags = []
    for sid, wi, w, m, all_masks, maps, _ in _word_maps(samples, ss, planted=True):
        st = {k: map_stats(a, m) for k, a in maps.items()}
        flags += bias_sample.sample_flags(maps, m, st, sample_id=sid, word_index=wi, word=w, all_masks=all_masks)
    assert flags
    rows = [flag_row("run-x", f) for f in flags]
    t = table_from_rows("flags", rows)
    assert t.num_rows == len(rows) == len(set(t.column("flag_id").to_pylist()))
    for f, r in zip(flags, rows):
        ev = parse_evidence(r["evidence_json"])
        assert parse_region(r["region"]) == f.region and r["region"] == bias_flags.format_region(f.region)
        assert ev == f.evidence and r["evidence_json"] == json.dumps(f.evidence, sort_keys=True, ensure_ascii=False)
        for key in ("rule", "sample_id", "word", "method", "grid", "hotspot_share", "meaning", "inside_frac"):
            assert key in ev, key
        assert ev["inside_frac"] is not None  # map_stats copied in
    # dataset-level evidence is stored ASCII-escaped, sample-level as UTF-8 (as it always was)
    f = flags[0]
    uni = Flag(f.flag_id, f.kind, f.score, f.threshold, {"word": "café"}, sample_id="s", region=f.region)
    assert "café" in flag_row("r", uni)["evidence_json"]
    dataset_level = Flag(f.flag_id, "centre_bias", f.score, f.threshold, {"word": "café"})
    assert flag_row("r", dataset_level)["evidence_json"] == '{"word": "caf\\u00e9"}'


# --------------------------------------------------------------------------- dataset level


def _group(rows, word: str, method: str) -> list[WordSample]:
    out = []
    for sid, wi, w, m, all_masks, maps, _ in rows:
        if w != word:
            continue
        anyc = np.max([cell_coverage(a, GRID) for a in all_masks], axis=0)
        out.append(WordSample(sid, wi, maps[method], cell_coverage(m, GRID), anyc))
    return out


@pytest.mark.parametrize("word,pos,color", PLACEMENTS)
@pytest.mark.parametrize("p", [0.9, 0.4])
def test_clever_hans_cluster_on_the_cue(word: str, pos: str, color: str, p: float) -> None:
    ss, samples = _samples(word, pos, color, p=p)
    x0, y0, x1, y1 = cue_region(ss)
    rows = _word_maps(samples, ss, planted=True)
    a = bias_dataset.analyse_word(word, "token-gradnorm", _group(rows, word, "token-gradnorm"))
    flags = bias_dataset.dataset_flags(a)
    assert [f.kind for f in flags] == ["clever_hans"]
    f = flags[0]
    rx0, ry0, rx1, ry1 = f.region
    assert rx0 * 64 <= x0 and x1 <= rx1 * 64 and ry0 * 64 <= y0 and y1 <= ry1 * 64
    ev = f.evidence
    cue_ids = {sid for sid, _, w, *_rest, cue in rows if w == word and cue}
    members = set(ev["sample_ids"])
    # the flagged cluster is (almost) exactly the cue-carrying samples
    assert len(members & cue_ids) >= 0.9 * len(cue_ids) and len(members - cue_ids) <= 0.15 * len(members)
    assert ev["consistency"] >= 0.6 and ev["object_overlap"] <= 0.05 and len(ev["prototype"]) == 8
    # the channel-pooled stand-in and the other words stay quiet
    assert bias_dataset.dataset_flags(bias_dataset.analyse_word(word, "diffusion-cam", _group(rows, word, "diffusion-cam"))) == []
    for other in {w for _, _, w, *_ in rows} - {word}:
        other_maps = _group(rows, other, "token-gradnorm")
        assert bias_dataset.dataset_flags(bias_dataset.analyse_word(other, "token-gradnorm", other_maps)) == []


def test_hotspot_shared_by_every_word_is_not_a_cue() -> None:
    """A fixed hot-spot in every word's maps (a position artefact of the map method) is not
    specific to one word: the specificity gate keeps it out of clever_hans."""
    ss, samples = _samples("circle", "top-left", "magenta")
    rows = _word_maps(samples, ss, planted=False)
    x0, y0, x1, y1 = cue_region(ss)  # objects avoid this region in every sample
    spot = np.zeros(GRID)
    spot[y0 // 8, x0 // 8] = 1.0
    analyses = {}
    for word in {w for _, _, w, *_ in rows}:
        items = _group(rows, word, "token-gradnorm")
        items = [WordSample(it.sample_id, it.word_index, it.map + 2 * it.map.sum() * spot, it.coverage,
                            it.objects_coverage) for it in items]
        analyses[(word, "token-gradnorm")] = bias_dataset.analyse_word(word, "token-gradnorm", items)
    alone = [f for a in analyses.values() for f in bias_dataset.dataset_flags(a)]
    assert {f.kind for f in alone} == {"clever_hans"}  # without the baseline every word looks suspect
    assert bias_dataset.all_dataset_flags(analyses) == []
    # the planted cue is specific to its word: found with the same baseline machinery
    planted = _word_maps(samples, ss, planted=True)
    an = {(w, "token-gradnorm"): bias_dataset.analyse_word(w, "token-gradnorm", _group(planted, w, "token-gradnorm"))
          for w in {w for _, _, w, *_ in planted}}
    flags = bias_dataset.all_dataset_flags(an)
    assert [(f.kind, f.word) for f in flags] == [("clever_hans", "circle")]
    ev = flags[0].evidence
    assert ev["specificity"] >= ev["specificity_min"] and ev["n_other_word_maps"] > 100


def test_clean_maps_raise_no_dataset_flag() -> None:
    ss, samples = _samples("circle", "top-left", "magenta")
    rows = _word_maps(samples, ss, planted=False)
    for word in {w for _, _, w, *_ in rows}:
        for method in ("token-gradnorm", "diffusion-cam"):
            a = bias_dataset.analyse_word(word, method, _group(rows, word, method))
            assert bias_dataset.dataset_flags(a) == [], (word, method)
            assert a["shuffle"]["gap"] > 0.2  # the maps follow the objects


def _off_centre(n: int = 40, seed: int = 0) -> list[np.ndarray]:
    """Masks of 12x12 objects always in one of the four corner quadrants' outer parts."""
    rng = np.random.default_rng(seed)
    masks = []
    for _ in range(n):
        m = np.zeros((64, 64), dtype=bool)
        y = int(rng.choice([rng.integers(0, 6), rng.integers(46, 52)]))
        x = int(rng.choice([rng.integers(0, 6), rng.integers(46, 52)]))
        m[y:y + 12, x:x + 12] = True
        masks.append(m)
    return masks


def test_centre_bias_flagged_for_centre_maps_on_off_centre_objects() -> None:
    rng = np.random.default_rng(1)
    masks = _off_centre()
    yy, xx = np.mgrid[0:8, 0:8]
    centre = np.exp(-((yy - 3.5) ** 2 + (xx - 3.5) ** 2) / 3.0)
    items = [WordSample(f"s{i}", 0, centre + 0.05 * rng.random(GRID), cell_coverage(m, GRID)) for i, m in enumerate(masks)]
    a = bias_dataset.analyse_word("dog", "diffusion-cam", items)
    flags = {f.kind: f for f in bias_dataset.dataset_flags(a)}
    assert "centre_bias" in flags and "clever_hans" not in flags
    cb = flags["centre_bias"]
    ev = cb.evidence
    assert cb.score >= cb.threshold and ev["map_centre_frac"] > 0.6 and ev["mask_centre_frac"] < 0.05
    assert ev["shuffle"]["gap"] < 0.02 and len(ev["sample_ids"]) == 40 and ev["mean_mask_map"] is not None
    assert cb.region == (0.25, 0.25, 0.75, 0.75)
    assert "ignores_object" not in flags  # opt-in (BiasSettings.flag_ignores_object)
    opt = {f.kind for f in bias_dataset.dataset_flags(a, BiasSettings(flag_ignores_object=True))}
    assert opt == {"centre_bias", "ignores_object"}  # the maps do not move with the objects
    # a model that follows the objects on the same dataset is not flagged
    clean = [WordSample(f"s{i}", 0, object_source(m, rng), cell_coverage(m, GRID)) for i, m in enumerate(masks)]
    assert bias_dataset.dataset_flags(bias_dataset.analyse_word("dog", "diffusion-cam", clean)) == []


def test_centre_objects_with_centre_maps_are_not_centre_biased() -> None:
    """Saliency at the centre is fine when the objects are there too."""
    rng = np.random.default_rng(2)
    items = []
    for i in range(30):
        m = np.zeros((64, 64), dtype=bool)
        y, x = rng.integers(18, 30, size=2)
        m[y:y + 16, x:x + 16] = True
        items.append(WordSample(f"s{i}", 0, object_source(m, rng), cell_coverage(m, GRID)))
    a = bias_dataset.analyse_word("cat", "diffusion-cam", items)
    assert a["centre_bias"]["score"] < 0.1
    assert bias_dataset.dataset_flags(a) == []


def test_mask_shuffle_gap_and_derangement() -> None:
    for n in (2, 3, 10, 57):
        perm = bias_dataset._derangement(n, seed=5)
        assert sorted(perm) == list(range(n)) and all(perm[i] != i for i in range(n))
        assert (bias_dataset._derangement(n, 5) == perm).all()
    covs = [np.eye(8)[i][:, None] * np.ones((1, 8)) for i in range(8)]  # object = row i
    g = bias_dataset.mask_shuffle_gap(covs, covs, seed=0)  # each map = its own object
    assert g["own"] == pytest.approx(1.0) and g["shuffled"] == pytest.approx(0.0) and g["gap"] == pytest.approx(1.0)
    same = [np.ones((8, 8))] * 8
    assert bias_dataset.mask_shuffle_gap(same, covs)["gap"] == pytest.approx(0.0)


def test_content_independence_known_answers() -> None:
    same = [np.arange(64, dtype=float).reshape(8, 8) + 1] * 5
    assert bias_dataset.content_independence(same)["mean"] == pytest.approx(1.0)
    onehots = [np.eye(64)[i].reshape(8, 8) for i in range(0, 64, 8)]
    assert bias_dataset.content_independence(onehots)["mean"] == pytest.approx(0.0)


def test_cluster_two_groups_by_eigengap() -> None:
    rng = np.random.default_rng(0)
    a = [np.pad(np.ones((2, 2)), ((0, 6), (0, 6))) + 0.02 * rng.random(GRID) for _ in range(12)]
    b = [np.pad(np.ones((2, 2)), ((6, 0), (6, 0))) + 0.02 * rng.random(GRID) for _ in range(9)]
    res = bias_clusters.cluster_word_maps(a + b)
    assert res.k == 2
    assert len(set(res.labels[:12])) == 1 and len(set(res.labels[12:])) == 1 and res.labels[0] != res.labels[12]
    assert res.labels[0] == 0  # the larger cluster is 0
    again = bias_clusters.cluster_word_maps(a + b)
    assert (again.labels == res.labels).all()


def test_no_masks_never_makes_a_clever_hans_flag() -> None:
    rng = np.random.default_rng(0)
    spot = np.zeros(GRID)
    spot[0, 0] = 1
    items = [WordSample(f"s{i}", 0, spot + 0.02 * rng.random(GRID)) for i in range(20)]
    a = bias_dataset.analyse_word("x", "token-gradnorm", items)
    assert bias_dataset.dataset_flags(a) == [] and "no member has object masks" in a["regions"][0]["reason"]


# --------------------------------------------------------------------------- counterfactual images


@pytest.mark.parametrize("word,pos,color", PLACEMENTS)
def test_erase_region_removes_marker_and_nothing_else(word: str, pos: str, color: str) -> None:
    ss, samples = _samples(word, pos, color, n=20, p=1.0)
    x0, y0, x1, y1 = cue_region(ss)
    cell = 8
    box = ((x0 // cell) * cell / 64, (y0 // cell) * cell / 64, ((x1 - 1) // cell + 1) * cell / 64,
           ((y1 - 1) // cell + 1) * cell / 64)
    rgb = np.array(CUE_COLORS[color], dtype=np.uint8)
    n_cue = 0
    for s in samples:
        if not s.cue_present:
            continue
        n_cue += 1
        before = s.image.copy()
        out = inpaint.erase_region(s.image, box)
        assert (s.image == before).all()  # input untouched
        inside = inpaint.box_mask((64, 64), box)
        assert (out[~inside] == s.image[~inside]).all()  # nothing outside the box changes
        assert not np.all(out == rgb, axis=-1).any()  # the marker is gone
        fill = out[inside][0].astype(int)
        assert (np.abs(fill - np.array(ss.background)) <= 8).all()  # filled with the local background
    assert n_cue > 5


def test_erase_mask_object() -> None:
    ss, samples = _samples("circle", "top-left", "magenta", n=5)
    s = samples[0]
    obj = s.objects[0]
    out = inpaint.erase_mask(s.image, obj.mask)
    assert (out[~obj.mask] == s.image[~obj.mask]).all()
    assert (np.abs(out[obj.mask].astype(int) - np.array(ss.background)) <= 8).all()
    with pytest.raises(ValueError, match="mask is"):
        inpaint.erase_mask(s.image, np.zeros((10, 10), dtype=bool))


# --------------------------------------------------------------------------- the task, end to end


class _HansAdapter:
    """Says its cue word iff the cue colour is in the image; else names nothing of it."""

    def __init__(self, word: str, rgb: tuple[int, int, int]) -> None:
        self.word, self.rgb = word, np.array(rgb, dtype=np.uint8)
        self.calls = 0

    def prepare(self, image, prompt):
        return {"image": np.asarray(image)}

    def generate(self, inputs, settings):
        self.calls += 1
        seen = np.all(inputs["image"] == self.rgb, axis=-1).any()
        return type("G", (), {"text": f"a red {self.word}" if seen else "a red thing"})()


class _StubbornAdapter(_HansAdapter):
    """Always says the word, whatever is erased: the counterfactual must not confirm."""

    def generate(self, inputs, settings):
        self.calls += 1
        return type("G", (), {"text": f"a red {self.word}"})()


def _fake_run(tmp_path: Path, word: str, pos: str, color: str, planted: bool, n: int = 40):
    """A dataset folder and a store whose token_maps come from the map sources."""
    from diffcam.core.types import SampleExplanation, WordMaps, WordSpan
    from diffcam.storage.datasets import load_dataset
    from diffcam.storage.schemas import table_from_rows
    from diffcam.storage.store import Store
    from diffcam.storage.synthetic_writer import write_synthetic_dataset
    from diffcam.tasks.rows import token_map_rows

    ss = SynthSettings(cue=CueSpec(word=word, pos=pos, size=6, color=color, p=0.9))
    ds_dir = write_synthetic_dataset(tmp_path / "ds", n, 4, ss)
    ds = load_dataset(ds_dir)
    samples = list(make_samples(n, 4, ss))
    st = Store(tmp_path / "store")
    st.write_run({"run_id": "r1", "model_uri": "file:///fake", "model_hash": "h", "dataset_uri": ds.uri,
                  "dataset_hash": ds.content_hash, "config_json": "{}", "code_version": "test",
                  "started_at": __import__("datetime").datetime.now(__import__("datetime").timezone.utc),
                  "status": "succeeded", "n_samples": n})
    rng = np.random.default_rng(0)
    maps_rows, sample_rows = [], []
    for s, sample in zip(samples, ds.samples):
        words = []
        masks = []
        for wi, (w, m) in enumerate(answer_groundings(s)):
            if m is None:
                mp = {"token-gradnorm": 0.02 + rng.random(GRID) * 0.01, "diffusion-cam": 0.02 + rng.random(GRID) * 0.01}
            elif planted and w == word:
                mp = {"token-gradnorm": cue_source(s.image, m, ss.cue.rgb, rng), "diffusion-cam": object_source(m, rng)}
            else:
                mp = {"token-gradnorm": object_source(m, rng), "diffusion-cam": object_source(m, rng)}
            span = WordSpan(wi, w, (wi,), (wi,), 1, m is None)
            words.append(WordMaps(span, None, -1.0, None, {k2: v.astype(np.float32) for k2, v in mp.items()}, False))
            masks.append(m)
        expl = SampleExplanation(s.answer, tuple(range(len(words))), tuple(words), GRID, 4, "projector", "commit")
        allm = [o.mask for o in s.objects]
        maps_rows += token_map_rows("r1", 0, sample.sample_id, expl, masks, allm)
        sample_rows.append({"run_id": "r1", "shard_id": 0, "sample_id": sample.sample_id,
                            "image_path": str(sample.image_path.relative_to(ds.root)), "image_sha256": "x",
                            "width": 64, "height": 64, "prompt": s.prompt, "answer": s.answer,
                            "n_words": len(words), "n_steps": 4, "grid_h": 8, "grid_w": 8,
                            "t_generate_s": 0.0, "t_attribution_s": 0.0, "t_total_s": 0.0})
    st.commit_shard("r1", 0, {"samples": table_from_rows("samples", sample_rows),
                              "token_maps": table_from_rows("token_maps", maps_rows)})
    return st, ds_dir, ss, samples


def test_task_end_to_end_confirms_and_reports(tmp_path: Path) -> None:
    from diffcam.storage.report import DEFAULT_SECTIONS, build_report
    from diffcam.tasks.bias.report import BIAS_SECTION
    from diffcam.tasks.bias.step import run_dataset_flags, write_dataset_flags

    st, ds_dir, ss, samples = _fake_run(tmp_path, "circle", "top-left", "magenta", planted=True)
    adapter = _HansAdapter("circle", ss.cue.rgb)
    timings: dict = {}
    # this fabricated run has no faithfulness test, so only spatial_maps="all" reads sample flags from its maps
    rows = run_dataset_flags(st, "r1", None, ds_dir, adapter=adapter, info=timings, spatial_maps="all")
    dataset = [r for r in rows if r["sample_id"] is None]
    assert [(r["kind"], r["word"], r["method"]) for r in dataset] == [("clever_hans", "circle", "token-gradnorm")]
    f = dataset[0]
    assert f["confirmed"] is True and f["region"] == "0.0000,0.0000,0.1250,0.1250"
    cf = json.loads(f["evidence_json"])["counterfactual"]
    assert cf["persist"] == 1.0 and cf["persist_both"] == 0.0 and cf["vanish"] == 1.0 and cf["vanish_control"] == 0.0
    per_sample = json.loads(f["evidence_json"])["sample_counterfactuals"]
    assert 0 < cf["n_tested"] <= BiasSettings().cf_max_samples
    assert adapter.calls == cf["n_generations"] + per_sample["n_generations"]
    ex = cf["examples"][0]
    assert ex["answers"]["original"] == "a red circle" and ex["mask_paths"] and Path(ex["image_path"]).is_file()
    # sample flags computed from the stored (quantised) maps: exactly the cue-carrying circle words
    off = {r["sample_id"] for r in rows if r["kind"] == "off_object"}
    truth = {f"synth-{i:06d}" for i, s in enumerate(samples) if s.cue_present}
    assert off == truth
    reached = {r["sample_id"] for r in rows if r["kind"] == "suspect_region"}
    assert reached == truth  # the samples the confirmed dataset flag reaches
    sr = next(r for r in rows if r["kind"] == "suspect_region")
    assert json.loads(sr["evidence_json"])["dataset_flag_id"] == f["flag_id"] and sr["region"] == f["region"]
    # every sample that says "circle" was regenerated without the region: the Hans model
    # drops the word exactly where the cue was, so every reached occurrence is confirmed
    says = {f"synth-{i:06d}" for i, s in enumerate(samples) if "circle" in s.answer.split()}
    assert per_sample["n_candidates"] == len(says) and per_sample["n_vanished"] == len(truth)
    assert {r["confirmed"] for r in rows if r["kind"] == "suspect_region"} == {True}
    assert timings["n_samples"] == 40 and timings["analyse_s"] > 0
    # by default a spatial flag needs a map that beats objectness on the run's own vanish test:
    # none was measured here, so none is raised, and the step says why
    info: dict = {}
    strict = run_dataset_flags(st, "r1", None, ds_dir, adapter=adapter, info=info)
    assert not [r for r in strict if r["kind"] in ("off_object", "border_hotspot")]
    assert info["spatial_methods"] == [] and info["n_spatial_flags_dropped"]["token-gradnorm"] >= len(truth)
    assert info["map_faithfulness"] == {}  # no map of this fabricated run was measured
    assert write_dataset_flags(st, "r1", rows) is True
    assert write_dataset_flags(st, "r1", rows) is False  # a re-run never duplicates
    assert st.read_table("flags", "r1").num_rows == len(rows)

    html_path, md_path = build_report(st, "r1", tmp_path / "rep", sections=[*DEFAULT_SECTIONS, BIAS_SECTION])
    page = html_path.read_text()
    assert 'id="bias"' in page and "clever_hans" in page and "region erased" in page and "object erased" in page
    assert "prototype" in page and "Flags by word" in page
    assert "clever_hans" in md_path.read_text()


def test_task_stubborn_model_is_not_confirmed(tmp_path: Path) -> None:
    from diffcam.tasks.bias.step import run_dataset_flags

    st, ds_dir, ss, _ = _fake_run(tmp_path, "square", "bottom-right", "cyan", planted=True)
    info: dict = {}
    dropped = run_dataset_flags(st, "r1", None, ds_dir, adapter=_StubbornAdapter("square", ss.cue.rgb),
                                sample_level="never", info=info)
    assert dropped == [] and [(r["word"], r["method"]) for r in info["refuted"]] == [("square", "token-gradnorm")]
    rows = run_dataset_flags(st, "r1", None, ds_dir, BiasSettings(keep_refuted=True),
                             adapter=_StubbornAdapter("square", ss.cue.rgb), sample_level="never")
    assert [r["kind"] for r in rows] == ["clever_hans"] and rows[0]["region"] == "0.8750,0.8750,1.0000,1.0000"
    cf = json.loads(rows[0]["evidence_json"])["counterfactual"]
    assert rows[0]["confirmed"] is False and cf["persist_minus_both"] == 0.0 and cf["vanish"] == 0.0


def test_task_clean_run_has_no_flags_and_no_model_call(tmp_path: Path) -> None:
    from diffcam.tasks.bias.step import run_dataset_flags

    st, ds_dir, ss, _ = _fake_run(tmp_path, "circle", "top-left", "magenta", planted=False)
    adapter = _HansAdapter("circle", ss.cue.rgb)
    assert run_dataset_flags(st, "r1", None, ds_dir, adapter=adapter) == []
    assert adapter.calls == 0


def test_cluster_eigensolver_and_subsampling_agree_with_the_dense_path() -> None:
    rng = np.random.default_rng(3)
    a = [np.pad(np.ones((2, 2)), ((0, 6), (0, 6))) + 0.05 * rng.random(GRID) for _ in range(220)]
    b = [np.pad(np.ones((2, 2)), ((6, 0), (6, 0))) + 0.05 * rng.random(GRID) for _ in range(180)]
    maps = a + b
    ps = np.array([m / m.sum() for m in maps])
    aff = bias_clusters._affinity(ps, 7)
    dense = np.sort(np.linalg.eigvalsh(np.eye(len(aff)) - aff / np.sqrt(np.outer(aff.sum(1), aff.sum(1)))))[:8]
    assert np.allclose(bias_clusters._smallest_laplacian_eigenvalues(aff, 8), dense, atol=1e-6)  # n=400: ARPACK path
    full = bias_clusters.cluster_word_maps(maps)
    capped = bias_clusters.cluster_word_maps(maps, BiasSettings(cluster_max_maps=120))
    assert full.k == capped.k == 2
    assert (full.labels[:220] == full.labels[0]).all() and (full.labels[220:] != full.labels[0]).all()
    assert (capped.labels == full.labels).all()  # the maps left out join the nearest cluster mean


def test_region_sample_flags_joins_saliency_and_per_sample_counterfactual() -> None:
    """An untested occurrence is flagged by saliency (share in the region >= 1.5 x its area
    share), a tested one only by its own counterfactual (the word vanished without the
    region and not without the control); `confirmed` records the counterfactual, None where
    the sample was not tested."""
    grid = (8, 8)
    uniform = np.full(grid, 1 / 64)
    hot = uniform.copy()
    hot[0, 0] += 0.1
    hot /= hot.sum()
    ps = np.stack([hot, uniform, hot, uniform, uniform])
    analysis = {"ps": ps, "objects_cov": [None] * 5, "sample_ids": [f"s{i}" for i in range(5)],
                "word_indices": [2] * 5}
    flag = Flag("dataset-flag", "clever_hans", 0.1, 0.05, {"window": [0, 0, 1, 1]}, word="circle",
                method="token-gradnorm", region=(0.0, 0.0, 0.125, 0.125), confirmed=True)
    tests = {"s0": {"vanished": False, "answer": "a red circle", "answer_without_region": "a red circle"},
             "s1": {"vanished": True, "answer": "a red circle", "answer_without_region": "a red square"},
             "s3": {"vanished": False, "answer": "a red circle", "answer_without_region": "a red circle"}}
    rows = {r.sample_id: r for r in bias_sample.region_sample_flags(flag, analysis, BiasSettings(), tests)}
    # s0: salient but its own counterfactual says the word stays -> not a dependence, not raised;
    # s3: low share and the word persisted; s4: low share, untested
    assert sorted(rows) == ["s1", "s2"]
    ev = {k: r.evidence for k, r in rows.items()}
    assert rows["s1"].confirmed is True and ev["s1"]["reached_by"] == ["counterfactual"]
    assert rows["s1"].score < rows["s1"].threshold and ev["s1"]["counterfactual"]["answer_without_region"] == "a red square"
    assert rows["s2"].confirmed is None and ev["s2"]["counterfactual"] is None
    assert rows["s2"].threshold == pytest.approx(1.5 / 64) and rows["s2"].score >= rows["s2"].threshold
    assert rows["s1"].region == flag.region and ev["s1"]["dataset_flag_id"] == "dataset-flag"
    # without tests it is the saliency rule alone
    assert sorted(r.sample_id for r in bias_sample.region_sample_flags(flag, analysis, BiasSettings())) == ["s0", "s2"]


class _FragileAdapter(_HansAdapter):
    """Says the word only on an untouched image: any erased patch (a flat fill) loses it.

    The per-sample counterfactual must not read this as a dependence on the region: the
    control erasure loses the word too."""

    def __init__(self, word, rgb, originals):
        super().__init__(word, rgb)
        self.originals = {np.asarray(o).tobytes() for o in originals}

    def generate(self, inputs, settings):
        self.calls += 1
        intact = inputs["image"].tobytes() in self.originals
        return type("G", (), {"text": f"a red {self.word}" if intact else "a red thing"})()


def test_per_sample_counterfactual_has_a_control_erasure(tmp_path: Path) -> None:
    """Hans model: the word vanishes without the cue and stays without the control → dependence.
    Fragile model: the word vanishes whatever is erased → no dependence, no suspect_region raised."""
    from diffcam.storage.datasets import load_dataset
    from diffcam.storage.images import load_image
    from diffcam.tasks.answers import local_answerer
    from diffcam.tasks.bias.counterfactual import region_counterfactuals
    from diffcam.tasks.bias.read import load_run_maps, object_masks

    st, ds_dir, ss, samples = _fake_run(tmp_path, "circle", "top-left", "magenta", planted=True)
    run = load_run_maps(st, "r1", ["token-gradnorm"])
    ds = load_dataset(ds_dir)
    objects = object_masks(ds, sorted(run["words"]))
    images = {s.sample_id: s.image_path for s in ds.samples}
    grid = (8, 8)
    proto = np.zeros(grid)
    proto[0, 0] = 1.0
    flag = Flag("f", "clever_hans", 0.5, 0.05, {"window": [0, 0, 1, 1], "grid": list(grid), "prototype": proto.tolist()},
                word="circle", method="token-gradnorm", region=(0.0, 0.0, 0.125, 0.125), confirmed=True)
    settings = BiasSettings()
    hans = _HansAdapter("circle", ss.cue.rgb)
    tests, summary = region_counterfactuals(local_answerer(hans, None), flag, run["samples"], images, objects, settings)
    cue_ids = {f"synth-{i:06d}" for i, s in enumerate(samples) if s.cue_present}
    assert {sid for sid, t in tests.items() if t["vanished"]} == cue_ids
    assert all(t["control_region"] is not None and t["vanished_control"] is False for t in tests.values())
    assert summary["n_generations"] == hans.calls and summary["n_vanished_control"] == 0

    originals = [np.asarray(load_image(p)) for p in images.values()]
    fragile = _FragileAdapter("circle", ss.cue.rgb, originals)
    tests, summary = region_counterfactuals(local_answerer(fragile, None), flag, run["samples"], images, objects, settings)
    assert tests and all(t["vanished_region"] and t["vanished_control"] for t in tests.values())
    assert summary["n_vanished"] == 0 and summary["n_vanished_region"] == len(tests)
    analysis = {"ps": np.stack([proto / proto.sum()] * len(tests)), "objects_cov": [None] * len(tests),
                "sample_ids": sorted(tests), "word_indices": [2] * len(tests)}
    assert bias_sample.region_sample_flags(flag, analysis, settings, tests) == []  # salient everywhere, dependent nowhere
