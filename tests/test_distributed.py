"""torchrun's environment (utils/distributed.py): each process's share of the inputs."""
import pytest

from utils.distributed import World


@pytest.mark.parametrize("n,batch,world", [(6, 2, 2), (5, 2, 2), (1, 8, 2), (17, 4, 3), (10, 1, 4)])
def test_shards_are_whole_batches_covering_every_input_once(monkeypatch, n, batch, world):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    blocks = []
    for rank in range(world):
        monkeypatch.setenv("RANK", str(rank))
        blocks.append(list(World().indices(n, batch)))
    assert sum(blocks, []) == list(range(n))
    assert all(b[0] % batch == 0 for b in blocks if b)
    counts = [-(-len(b) // batch) for b in blocks]
    assert max(counts) - min(counts) <= 1
