"""Data parallelism keeps replicas identical: every stage trained by 2 torchrun processes (gloo,
CPU) ends with the same state_dict on both ranks, buffers included (the auto-encoder's running
feature and latent statistics, LDLM's adaptive-time histogram, Di-LADD's VQ codebook, ...).

One test parametrised over the stages; each case is one torchrun launch of a few steps."""

import pytest
from conftest import TINY, torchrun_replica_digests
from latent_fixtures import AE_SMALL, PRIOR_SMALL
from test_ladd import SMALL as LADD_SMALL
from test_ldlm import SMALL as LDLM_SMALL
from test_ldlm import train as train_ldlm

ACCUMULATE = ["train.micro_batch_size=2"]  # 2 ranks x 2 accumulation steps x 2 rows

# kind -> (parent flag, parent run: a key of the latent chain or "ldlm", overrides)
CASES = {
    "mdlm": (None, None, [*TINY, "train.max_steps=6", *ACCUMULATE]),
    "duo": (None, None, [*TINY, "train.max_steps=4", *ACCUMULATE]),
    "co-ladd": (None, None, [*TINY, *LADD_SMALL, "train.max_steps=4", *ACCUMULATE]),
    "di-ladd": (None, None, [*TINY, *LADD_SMALL, "train.max_steps=4", *ACCUMULATE]),
    "ldlm": (
        None,
        None,
        [*TINY, *LDLM_SMALL, "ldlm.ats_refresh_every=2", "train.max_steps=5", *ACCUMULATE],
    ),
    "autoencoder": ("--init-from", "mdlm", [*AE_SMALL, "train.max_steps=3"]),
    "ladiff": ("--autoencoder", "ae", [*PRIOR_SMALL, "train.max_steps=3"]),
    "diladiff": ("--teacher", "ladiff", ["train.max_steps=3"]),
    "ldlm_decoder": (
        "--init-from",
        "ldlm",
        [*TINY, "ldlm_decoder.layers=1", "train.max_steps=3", *ACCUMULATE],
    ),
}


@pytest.mark.distributed
@pytest.mark.parametrize("kind", sorted(CASES))
def test_two_process_torchrun_keeps_replicas_identical(kind, request, tmp_path):
    flag, parent, overrides = CASES[kind]
    extra = []
    if parent == "ldlm":
        assert train_ldlm(tmp_path / "ldlm", "train.max_steps=2") == 0
        parent_args = [flag, str(tmp_path / "ldlm")]
    elif parent is not None:
        chain = request.getfixturevalue("latent_chain")
        parent_args = [flag, str(chain[parent])]
        extra = ["train.progress=false", "train.batch_size=4"]
    else:
        parent_args = []
    digests = torchrun_replica_digests(kind, tmp_path / "ddp", *parent_args, *overrides, *extra)
    assert len(digests) == 2 and digests[0] == digests[1]
