"""The scoring interface (utils/scoring): a strategy is one module and its registration; its
options become every front end's flags; zero-shot scoring leaves the maps as they are."""
import pkgutil
import sys
from dataclasses import dataclass, field

import numpy as np
import pytest

import utils.scoring as scoring
from utils.cli import ArgumentParser, add_scoring_flags
from utils.errors import UsageError
from utils.scoring import STRATEGIES, GroupScorer, Strategy, ZeroShot, make_strategy, register


def test_every_module_of_the_package_is_imported_with_it():
    names = {m.name for m in pkgutil.iter_modules(scoring.__path__)}
    assert {"mutual", "reference", "fusion"} <= names
    assert all(f"utils.scoring.{name}" in sys.modules for name in names)
    assert list(STRATEGIES) == ["zero_shot", "mutual", "reference"]


@dataclass(frozen=True)
class _DummyOptions:
    dummy_weight: float = field(default=0.5, metadata={"help": "a weight"})
    dummy_sizes: tuple[int, ...] = (1, 2)


@pytest.fixture()
def dummy():
    """A strategy registered as a new module would register it (removed afterwards)."""
    @register
    class Dummy(Strategy):
        name = "dummy"
        Options = _DummyOptions

        def group(self, name):
            return GroupScorer()
    yield Dummy
    del STRATEGIES["dummy"]


@pytest.mark.parametrize("argv, weight, sizes", [([], 0.5, (1, 2)),
                                                 (["--dummy_sizes", "3"], 0.5, (3,)),
                                                 (["--dummy_weight", "2", "--dummy_sizes", "4",
                                                   "5", "6"], 2.0, (4, 5, 6))])
def test_a_registered_strategys_options_are_flags(dummy, argv, weight, sizes):
    """A scalar field takes one value, a tuple field one or more (a tuple again)."""
    parser = ArgumentParser()
    add_scoring_flags(parser, references="paths")
    args = parser.parse_args(["--scoring", "dummy", *argv])
    strategy = make_strategy(args.scoring, vars(args))
    assert isinstance(strategy, dummy)
    assert strategy.options == _DummyOptions(weight, sizes)
    assert strategy.describe() == {"scoring": "dummy", "fusion": "sum", "dummy_weight": weight,
                                   "dummy_sizes": sizes}


def test_zero_shot_finish_keeps_the_maps_and_the_top_k_score():
    raw, new = np.random.default_rng(0).random((2, 3, 8, 8), dtype=np.float32)
    strategy = ZeroShot()
    out_raw, out_new, scores = strategy.finish(raw, new, None, strategy.group("x"))
    assert out_raw is raw and out_new is new and scores is None
    assert strategy.min_images == 1
    strategy.check_sizes({"x": 1}, "folder")  # any group will do


def test_mutual_needs_enough_images_for_msm():
    mutual = make_strategy("mutual", {"mutual_fraction": 0.25})
    assert mutual.min_images == 5  # floor(0.25 * 4) = 1
    mutual.check_sizes({"a": 5, "b": 9}, "product")
    with pytest.raises(UsageError) as error:
        mutual.check_sizes({"a": 5, "b": 4, "c": 1}, "product")
    assert error.value.option == "mutual_fraction"
    assert "at least 5 images in each product" in str(error.value)
    assert "b (4), c (1)" in str(error.value)

