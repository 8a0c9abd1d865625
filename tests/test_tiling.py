"""Tiled inference (utils/inference/tiling.py and the prediction service): the grid covers the
image exactly, the blend weights sum to 1, stitching is exact for position-coded tile maps (pure,
and end to end through a runtime that reads each pixel's position off the tile it is given), a
grid of one tile is the untiled map, untiled outputs are those of the untiled service bit for
bit, runs that start at a later batch give the same maps (torchrun, --resume), references and
mutual scoring take tiles, and the flags refuse what makes no sense."""
import csv
import math

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter

import predict
from utils.data.dataset import CLIP_MEAN, CLIP_STD, image_transform
from utils.data.images import read_rgb
from utils.evaluation.metrics import image_scores, smoothed_blend
from utils.inference.prediction import Prediction, Predictor, Skipped
from utils.inference.runtime import ModelSource, RuntimeOutput, TorchRuntime
from utils.inference.tiling import Stitcher, Tiling, grid, layout, starts, whole
from utils.errors import UsageError

# (width, height, side, overlap): squares, a 1xN strip, an Nx1 strip, tiles larger than the
# image (one tile; a thin image), odd sizes, several overlaps
SHAPES = [(64, 64, 64, 0.25), (100, 100, 40, 0.25), (300, 40, 64, 0.25), (37, 211, 30, 0.5),
          (50, 50, 100, 0.25), (70, 30, 100, 0.1), (129, 97, 32, 0.75), (200, 120, 48, 0.05)]


@pytest.mark.parametrize("width, height, side, overlap", SHAPES + [(1000, 31, 16, 0.9)])
def test_the_grid_covers_the_image_exactly_with_the_fewest_square_tiles(width, height, side,
                                                                       overlap):
    boxes = grid((width, height), Tiling(side, overlap))
    t = min(side, width, height)
    covered = np.zeros((height, width), int)
    for x0, y0, x1, y1 in boxes:
        assert x1 - x0 == y1 - y0 == t and 0 <= x0 and x1 <= width and 0 <= y0 and y1 <= height
        covered[y0:y1, x0:x1] += 1
    assert covered.min() >= 1  # every pixel, no padding (every box lies inside the image)
    for length in (width, height):
        s = starts(length, t, overlap)
        assert s[0] == 0 and s[-1] == length - t and s == sorted(set(s))
        if len(s) > 1:  # neighbours share at least the overlap (to the rounding of a start)
            assert max(b - a for a, b in zip(s, s[1:])) <= t * (1 - overlap) + 1
            # one tile fewer could not keep that overlap
            assert (length - t) / (len(s) - 2 or 1) > t * (1 - overlap) or len(s) == 2
    assert len(boxes) == len(starts(width, t, overlap)) * len(starts(height, t, overlap))


def position(plan, tile, size, f):
    """The tile map [S, S] of a position-coded runtime: f at each tile-map pixel's centre, in
    image coordinates."""
    x0, y0, x1, _ = plan.boxes[tile]
    centres = (np.arange(size) + 0.5) * (x1 - x0) / size
    return f(x0 + centres[None, :], y0 + centres[:, None]).astype(np.float32)


@pytest.mark.parametrize("width, height, side, overlap", SHAPES)
@pytest.mark.parametrize("size, max_side", [(32, 10_000), (20, 10_000), (32, 50)])
def test_stitching_is_exact_for_position_coded_tile_maps(width, height, side, overlap, size,
                                                         max_side):
    """Affine maps of the image position come back as that map at each stitched pixel's
    centre (clamped at the image's border half a tile-map pixel in, as every tile clamps); the
    weights sum to 1 everywhere, the border included."""
    plan = layout((width, height), Tiling(side, overlap), size, max_side)
    f = lambda x, y: 0.3 + 0.01 * x - 0.02 * y
    raw_of = lambda x, y: 1.0 + 0 * x * y
    stitcher = Stitcher(plan)
    for tile in reversed(range(plan.tiles)):  # any order
        stitcher.add(tile, position(plan, tile, size, raw_of), position(plan, tile, size, f))
    assert stitcher.complete
    ones, got = stitcher.maps()
    h, w = plan.shape
    assert max(h, w) <= max_side
    assert np.abs(ones - 1).max() < 1e-6  # the weights' sum at every pixel
    t = min(side, width, height)
    m = t / (2 * size)  # half a tile-map pixel
    x = np.clip((np.arange(w) + 0.5) * width / w, m, width - m)
    y = np.clip((np.arange(h) + 0.5) * height / h, m, height - m)
    assert np.abs(got - f(x[None, :], y[:, None])).max() < 1e-4


def test_abutting_tiles_meet_without_a_gap():
    """Overlap 0: each map pixel takes the tile it lies in (clamped within half a tile-map
    pixel of a seam); the weights still sum to 1."""
    plan = layout((96, 32), Tiling(32, 0.0), 16, 10_000)
    assert plan.boxes == [(0, 0, 32, 32), (32, 0, 64, 32), (64, 0, 96, 32)]
    stitcher = Stitcher(plan)
    f = lambda x, y: 0.01 * x + 0 * y
    for tile in range(plan.tiles):
        stitcher.add(tile, position(plan, tile, 16, lambda x, y: 1.0 + 0 * x * y),
                     position(plan, tile, 16, f))
    ones, got = stitcher.maps()
    assert np.array_equal(ones, np.ones_like(ones))
    x = (np.arange(48) + 0.5) * 2
    assert np.abs(got - f(x, 0)[None, :]).max() <= 0.01 * 1 + 1e-6  # half a tile pixel = 1 px


def test_one_tile_is_the_untiled_map_bit_for_bit():
    """An image of S px and a tile of S px, or a square image under a larger tile: the stitched
    maps are the tile's maps, unchanged, and the scale is 1 (sigma 8, top 2000)."""
    rng = np.random.default_rng(0)
    raw, new = rng.random((2, 24, 24), dtype=np.float32)
    for plan in (whole(24), layout((24, 24), Tiling(24), 24, 4096),
                 layout((10, 10), Tiling(64), 24, 4096)):
        stitcher = Stitcher(plan)
        stitcher.add(0, raw, new)
        assert plan.tiles == 1 and plan.scale == 1.0 and plan.shape == (24, 24)
        assert all(np.array_equal(a, b) for a, b in zip(stitcher.maps(), (raw, new)))


# -- end to end: a runtime that reads the position of every pixel off the tile it is given ---

S = 32


def coded_image(width: int, height: int) -> np.ndarray:
    """uint8 RGB [H, W, 3] whose pixel (x, y) holds x % 256, y % 256 and (x // 256, y // 256)."""
    x, y = np.meshgrid(np.arange(width), np.arange(height))
    return np.stack([x % 256, y % 256, (x // 256) * 16 + y // 256], -1).astype(np.uint8)


TABLE = np.random.default_rng(3).random((2, 512, 512), dtype=np.float32)  # raw, new per (y, x)


class PositionRuntime:
    """Reads each input pixel's image position off its colour (tiles of S px are exact crops)
    and returns TABLE at those positions: a tile map that is exact wherever the tile lies."""

    image_size, has_features = S, False

    def __init__(self):
        self.batches = []

    def __call__(self, images):
        self.batches.append(len(images))
        mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
        rgb = torch.round((images * std + mean) * 255).long().numpy()  # [B, 3, S, S]
        x = np.clip(rgb[:, 0] + 256 * (rgb[:, 2] // 16), 0, 511)  # resized (untiled): any
        y = np.clip(rgb[:, 1] + 256 * (rgb[:, 2] % 16), 0, 511)  # pixel still maps somewhere
        return RuntimeOutput(TABLE[0][y, x], TABLE[1][y, x])


@pytest.fixture(scope="module")
def coded(tmp_path_factory):
    """Images of several shapes (a strip, a tall one, one tile, a multiple of S) and a corrupt
    file."""
    d = tmp_path_factory.mktemp("coded")
    shapes = {"a_square": (100, 100), "b_strip": (300, 32), "c_one": (32, 32), "d_tall": (40, 90),
              "f_exact": (64, 96)}
    for name, (w, h) in shapes.items():
        Image.fromarray(coded_image(w, h)).save(d / f"{name}.png")
    (d / "e_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    return sorted(d.iterdir())


def test_tiled_predictions_are_the_oracle_maps_at_the_image_resolution(coded):
    runtime = PositionRuntime()
    predictor = Predictor(runtime, batch_size=3, tiling=Tiling(S, 0.3))
    results = sorted(predictor(coded), key=lambda r: r.index)
    assert [type(r) for r in results] == [Prediction, Prediction, Prediction, Prediction,
                                          Skipped, Prediction]
    assert [r.index for r in results] == list(range(6)) and "cannot read it" in results[4].reason
    tiles = [len(grid(Image.open(p).size, Tiling(S, 0.3))) if p.stem != "e_corrupt" else 1
             for p in coded]
    assert [r.tiles for r in results] == tiles and predictor.tile_count(coded) == sum(tiles)
    assert tiles[2] == 1 and tiles[1] > 1
    # batches of 3 tiles across images, afresh every 3 images; the corrupt file's tile drops out
    expected = []
    for first in (0, 3):
        good = [k != 4 for k in range(first, first + 3) for _ in range(tiles[k])]
        expected += [sum(good[b:b + 3]) for b in range(0, len(good), 3)]
    assert runtime.batches == [n for n in expected if n]
    for r, path in zip(results, coded):
        if isinstance(r, Skipped):
            continue
        w, h = Image.open(path).size
        raw, new = TABLE[0][:h, :w], TABLE[1][:h, :w]  # S px tiles: one map pixel per pixel
        assert r.size == (w, h) and r.amap.shape == (h, w)
        want = gaussian_filter(0.2 * raw + 0.8 * new, sigma=8)
        assert np.abs(r.amap - want).max() < 1e-5
        top = lambda m: np.sort(m.ravel())[-2000:].mean()
        assert r.image_score == pytest.approx(top(raw) + top(new), abs=1e-5)


def test_the_stitched_map_is_capped_and_its_scale_follows(coded):
    """A cap halves the map: each map pixel samples the centre of 2 x 2 pixels (their mean);
    sigma and the top-k count scale with it (4, 500)."""
    r = next(iter(Predictor(PositionRuntime(), tiling=Tiling(S), max_map_side=50)(coded[:1])))
    raw, new = (t[:100, :100].reshape(50, 2, 50, 2).mean((1, 3))[None] for t in TABLE)
    assert r.amap.shape == (50, 50)
    assert np.abs(r.amap - smoothed_blend(raw, new, sigma=4)[0]).max() < 1e-5
    assert r.image_score == pytest.approx(image_scores(raw, new, top_k=500)[0], abs=1e-5)


def test_untiled_is_the_whole_image_as_before(coded):
    """Without tiling each image is squashed to S x S: what the untiled service computed
    (batches of images, the blend and the score of the batch), bit for bit."""
    runtime = PositionRuntime()
    results = [r for r in Predictor(runtime, batch_size=2)(coded) if isinstance(r, Prediction)]
    good = [p for p in coded if p.stem != "e_corrupt"]
    images = torch.stack([image_transform(S)(read_rgb(p)) for p in good])
    assert runtime.batches == [2, 2, 1]  # the corrupt file is the 5th: a batch of one
    out = [runtime(images[:2]), runtime(images[2:4]), runtime(images[4:])]
    raw, new = np.concatenate([o.raw for o in out]), np.concatenate([o.new for o in out])
    assert np.array_equal(np.stack([r.amap for r in results]), smoothed_blend(raw, new))
    assert [r.image_score for r in results] == [float(s) for s in image_scores(raw, new)]
    assert all(r.tiles == 1 for r in results)


# -- the real (tiny) model ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def runtime(tiny_archive, tiny_checkpoint):
    return TorchRuntime.load(ModelSource(str(tiny_checkpoint), str(tiny_archive)),
                             torch.device("cpu"))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiled_photos")
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(90, 70), (160, 48), (40, 40), (75, 75), (120, 90)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(d / f"p{i}.png")
    return sorted(d.iterdir())


def test_a_run_starting_at_a_later_batch_gives_the_same_maps(runtime, photos):
    """torchrun shards and --resume restarts at a batch of images: the tiles are batched alike
    there, so each image's map is the same, bit for bit."""
    run = Predictor(runtime, batch_size=2, tiling=Tiling(48, 0.25))
    paths = [photos[0], photos[2], photos[3]]  # 6, 1 and 4 tiles: batches 2 2 2 1 | 2 2
    whole_run = {r.path: r for r in run(paths)}
    later = {r.path: r for r in run(paths[2:])}
    assert len(later) == 1
    for path, r in later.items():
        assert np.array_equal(r.amap, whole_run[path].amap)
        assert r.image_score == whole_run[path].image_score


def test_references_are_tiled_and_mutual_scoring_takes_tiles(runtime, photos, tiny_cfg):
    from utils.scoring import Context, make_strategy
    from utils.scoring.reference import memory_of
    tiling = Tiling(48, 0.25)
    tiles = [len(grid(Image.open(p).size, tiling)) for p in photos]
    patches = (56 // tiny_cfg.patch_size) ** 2  # per tile
    memory = memory_of(photos[:2], runtime, 56, batch_size=3, tiling=tiling)
    assert [m.shape[0] for m in memory] == [sum(tiles[:2]) * patches] * 4
    context = Context(runtime, 56, photos[:2], batch_size=3)
    reference = make_strategy("reference", {}, context)
    results = list(Predictor(runtime, reference, batch_size=3, tiling=tiling)(photos[2:4]))
    assert all(isinstance(r, Prediction) for r in results)
    assert [r.amap.shape for r in results] == [stitched(p, 48) for p in photos[2:4]]
    # one image of 6 tiles is a group MuSc can score (5 images would be needed untiled)
    mutual = make_strategy("mutual", {}, Context(runtime, 56))
    with pytest.raises(UsageError, match="needs at least"):
        from utils.inference.prediction import check_groups
        check_groups(photos[:1], mutual)
    check_groups(photos[:1], mutual, tiling)
    (r,) = Predictor(runtime, mutual, tiling=tiling)(photos[:1])
    assert isinstance(r, Prediction) and r.tiles == tiles[0] == 6
    assert r.amap.shape == stitched(photos[0], 48)


def stitched(path, side, size=56):
    """(height, width) of the stitched map: size / t map px per image px, rounded half up."""
    w, h = Image.open(path).size
    t = min(side, w, h)
    return math.floor(h * size / t + 0.5), math.floor(w * size / t + 0.5)


def run_predict(tmp_path, archive, checkpoint, out, *inputs_and_flags):
    return predict.main([*map(str, inputs_and_flags), "--checkpoint_path", str(checkpoint),
                         "--pretrained_path", str(archive), "--save_path", str(tmp_path / out),
                         "--device", "cpu", "--num_workers", "0", "--batch_size", "2",
                         "--save_maps", "--threshold", "0.5"])


def test_predict_one_tile_equals_untiled_and_tiles_are_counted(tmp_path, tiny_archive,
                                                               tiny_checkpoint, photos, capsys):
    """A square image no larger than the tile: maps/, scores.csv and the overlay of --tile are
    the untiled run's, byte for byte; the summary counts tiles and a folder's other files are
    named once."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "p2.png").write_bytes(photos[2].read_bytes())  # 40 x 40
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    (tmp_path / "in" / "sub").mkdir()
    for out, flags in (("plain", []), ("tiled", ["--tile", "48"])):
        assert run_predict(tmp_path, tiny_archive, tiny_checkpoint, out, tmp_path / "in",
                           *flags) == 0
    captured = capsys.readouterr()
    assert captured.err.count("not inspected") == 4  # two runs, two entries each
    assert "notes.txt: not an image file name" in captured.err
    assert "sub: a folder inside a folder" in captured.err
    assert captured.out.count("tiles per image: 1 (1 image);") == 2
    for rel in ("scores.csv", "maps/p2.npy", "overlays/p2.png", "masks/p2.png"):
        assert (tmp_path / "plain" / rel).read_bytes() == (tmp_path / "tiled" / rel).read_bytes()


def test_predict_and_calibrate_on_stitched_maps(tmp_path, tiny_archive, tiny_checkpoint, photos,
                                                capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    photos = photos[:3]  # 6, 6 and 1 tiles
    for p in photos:
        (folder / p.name).write_bytes(p.read_bytes())
    assert run_predict(tmp_path, tiny_archive, tiny_checkpoint, "out", folder, "--tile", "48",
                       "--tile_overlap", "0.5") == 0
    out = capsys.readouterr().out
    tiles = [len(grid(Image.open(p).size, Tiling(48, 0.5))) for p in photos]
    assert tiles == [6, 6, 1]
    counts = ", ".join(f"{t} ({n} image{'s' * (n > 1)})" for t, n in
                       sorted({t: tiles.count(t) for t in tiles}.items()))
    assert f"tiles per image: {counts}; " in out and "s per megapixel" in out
    for p in photos:
        assert np.load(tmp_path / "out" / "maps" / f"{p.stem}.npy").shape == stitched(p, 48)
        mask = Image.open(tmp_path / "out" / "masks" / f"{p.stem}.png")
        assert mask.size == Image.open(p).size
    with open(tmp_path / "out" / "scores.csv") as f:
        top = max(float(r["max_pixel_score"]) for r in csv.DictReader(f))
    assert predict.main(["--calibrate", str(folder), "--false_alarm_rate", "0", "--tile", "48",
                         "--tile_overlap", "0.5", "--checkpoint_path", str(tiny_checkpoint),
                         "--pretrained_path", str(tiny_archive), "--device", "cpu",
                         "--num_workers", "0", "--batch_size", "2"]) == 0
    assert f"T = {top!r}" in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [
    (["--tile_overlap", "0.5"], "error: --tile_overlap sets the overlap of tiles: give --tile"),
    (["--tile", "8"], "error: argument --tile: expected an integer >= 16, got 8"),
    (["--tile", "64", "--tile_overlap", "1"], "error: --tile_overlap expected a fraction"),
])
def test_tile_flags_that_make_no_sense_are_one_line_errors(tmp_path, tiny_archive,
                                                           tiny_checkpoint, photos, capsys,
                                                           flags, message):
    try:
        code = run_predict(tmp_path, tiny_archive, tiny_checkpoint, "out", photos[0], *flags)
    except SystemExit as e:  # argparse's errors
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


# -- EXIF orientation ----------------------------------------------------------------------------

class BrightRuntime:
    """map = the input's red channel in [0, 1]: bright pixels are "defects"."""

    image_size, has_features = 24, False

    def __call__(self, images):
        red = (images[:, 0] * CLIP_STD[0] + CLIP_MEAN[0]).numpy()
        return RuntimeOutput(red, red)


@pytest.fixture()
def turned(tmp_path):
    """(stored with EXIF orientation 6 = shown turned 90 degrees clockwise, the same picture
    stored upright, the bright spot's box as shown)."""
    stored = np.full((60, 100, 3), 40, np.uint8)  # 100 wide, 60 high as stored
    stored[5:35, 65:95] = 255  # a bright spot, top right as stored
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "phone.jpg", exif=exif, quality=100)
    shown = read_rgb(tmp_path / "phone.jpg")
    shown.save(tmp_path / "upright.png")
    return tmp_path / "phone.jpg", tmp_path / "upright.png"


@pytest.mark.parametrize("tiling", [None, Tiling(40, 0.25)])
def test_an_exif_turned_photo_is_inspected_as_shown(tmp_path, turned, tiling):
    from utils.inference.outputs import OutputWriter
    phone, upright = turned
    assert Image.open(phone).size == (100, 60) and Image.open(upright).size == (60, 100)
    results = list(Predictor(BrightRuntime(), tiling=tiling)([phone, upright]))
    assert np.array_equal(results[0].amap, results[1].amap)
    middle = float(results[0].amap.max() + results[0].amap.min()) / 2
    writer = OutputWriter(tmp_path / "out", threshold=middle, save_maps=True)
    for r in results:
        assert r.size == (60, 100)
        writer.write(r.path.stem, r)
    out = tmp_path / "out"
    for kind in ("overlays", "masks"):
        a, b = (np.asarray(Image.open(out / kind / f"{n}.png")) for n in ("phone", "upright"))
        assert a.shape[:2] == (100, 60) and np.array_equal(a, b)
    mask = np.asarray(Image.open(out / "masks" / "phone.png")) > 0
    shown = np.asarray(read_rgb(upright))[..., 0] > 128  # the spot where a viewer shows it
    ys, xs = np.nonzero(mask)
    assert shown[ys, xs].mean() > 0.5 and 65 <= ys.mean() <= 95 and 25 <= xs.mean() <= 55


def test_the_service_takes_a_tile_per_job_and_shows_photos_as_shown(turned):
    from utils.inference.outputs import capped_size
    from utils.serving.service import Service
    phone, _ = turned
    service = Service(Predictor(BrightRuntime(), tiling=Tiling(40)), threshold=0.5)
    try:
        jobs = {}
        for tile in (None, 0, 30):
            folder = service.new_folder()
            copy = folder / "phone.jpg"
            copy.write_bytes(phone.read_bytes())
            jobs[tile] = service.submit("me", "inspect", {"images": [(copy, "phone.jpg")]},
                                        folder, tile=tile)
        for job in jobs.values():
            assert job.over.wait(20) and job.error is None
        shapes = {tile: job.items[0].amap.shape for tile, job in jobs.items()}
        assert shapes == {None: (round(100 * 24 / 40), round(60 * 24 / 40)), 0: (24, 24),
                          30: (80, 48)}
        assert jobs[0].memory == 4 * 24 * 24 and jobs[30].memory == 4 * 80 * 48
        for tile, job in jobs.items():
            mask = service.picture("me", job.id, 0, "mask", threshold=0.5)
            overlay = service.picture("me", job.id, 0, "overlay")
            assert mask.shape == (100, 60) and overlay.shape == (100, 60, 3)
            data = service.map_data("me", job.id, 0, side=20)
            h, w = shapes[tile]
            assert (data["width"], data["height"]) == capped_size((w, h), 20)
    finally:
        service.close()
