"""Position tables between a sequence and its latent (nets/positions.py), and the token
denoiser's positions (model.positions: a learned table or RoPE, nets/rotary.py)."""

import pytest
import torch

from diladiff.methods.autoencoder.cross_attention import LatentCrossAttention
from diladiff.nets.perceiver import PerceiverCompressor
from diladiff.nets.positions import latent_centres, sinusoidal_table


def test_tables_align_each_position_with_the_nearest_latent_centre():
    L, n_z, d = 64, 16, 32
    q = sinusoidal_table(torch.arange(L), d)
    centres = latent_centres(n_z, L)
    k = sinusoidal_table(centres, d)
    scores = q @ k.T
    best = scores.argmax(dim=1)
    # The best-scoring latent's centre is within one position of the nearest centre (ties at
    # the half-way points between centres go either way) ...
    distance = (torch.arange(L) - centres[best]).abs()
    assert distance.max() <= L / n_z / 2 + 1
    # ... and far latents score well below the best one.
    far = (torch.arange(L).unsqueeze(1) - centres.unsqueeze(0)).abs() > L / 4
    assert (scores[far].max() < scores.max(dim=1).values.min() - 1).item()
    assert centres.tolist() == [4.0 * j + 2.0 for j in range(n_z)]  # (j + 1/2) L / N_z


def _copy_task_accuracy(position_tables: bool, steps: int = 300) -> float:
    """Every query position sees the same hidden state (as a fully masked decoder does); the
    latent holds one token per position; a cross-attention layer + linear readout must output
    the token at its own position."""
    torch.manual_seed(0)
    L, vocab, width = 8, 6, 32
    layer = LatentCrossAttention(
        width,
        vocab,
        heads=2,
        max_len=L if position_tables else 0,
        num_latents=L if position_tables else 0,
    )
    readout = torch.nn.Linear(width, vocab)
    opt = torch.optim.Adam([*layer.parameters(), *readout.parameters()], lr=1e-2)
    h = torch.ones(64, L, width)
    for _ in range(steps):
        tokens = torch.randint(vocab, (64, L))
        z = torch.nn.functional.one_hot(tokens, vocab).float()
        loss = torch.nn.functional.cross_entropy(
            readout(layer(h, z)).flatten(0, 1), tokens.flatten()
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    tokens = torch.randint(vocab, (256, L))
    z = torch.nn.functional.one_hot(tokens, vocab).float()
    with torch.no_grad():
        pred = readout(layer(h[:1].expand(256, -1, -1), z)).argmax(-1)
    return (pred == tokens).float().mean().item()


def test_identical_queries_can_read_their_own_position_only_with_position_tables():
    with_tables = _copy_task_accuracy(True)
    without = _copy_task_accuracy(False)
    # Identical queries give identical outputs at every position, so without tables the best
    # is the sequence's majority token (about 0.4 for 8 draws from 6 tokens).
    assert without < 0.5
    assert with_tables > 0.9


def test_perceiver_latents_first_read_the_positions_around_their_centres():
    torch.manual_seed(0)
    L, n_z, d_in = 64, 16, 24
    enc = PerceiverCompressor(d_in, 64, n_z, 8, depth=1, heads=2, max_len=L)
    h = torch.randn(1, L, d_in, requires_grad=True)
    z = enc(h)
    centres = latent_centres(n_z, L)
    hits = 0
    for j in range(n_z):
        (grad,) = torch.autograd.grad(z[0, j].square().sum(), h, retain_graph=True)
        most_read = grad[0].norm(dim=-1).argmax().item()
        hits += abs(most_read - centres[j].item()) <= L / n_z
    assert hits >= n_z - 1
    plain = PerceiverCompressor(d_in, 64, n_z, 8, depth=1, heads=2)
    assert plain.layers[0].q_pos is None


def _pair_task_accuracy(positions: str, steps: int = 150) -> float:
    """Rows of adjacent equal pairs [a, a, b, b, ...] with one token of each pair masked: the
    answer is the pair partner, one position left or right. Every pair's tokens are in the
    row, so only the position tells which one is the partner (a bag of words gets ~1/pairs)."""
    from diladiff.config import ModelConfig
    from diladiff.nets.token_denoiser import TokenDenoiser

    torch.manual_seed(0)
    L, vocab, mask_id = 12, 24, 23
    net = TokenDenoiser(ModelConfig(depth=2, width=32, heads=2, positions=positions), vocab, L)
    if positions == "learned":  # the control: no position signal at all
        net.backbone.pos.data.zero_()
        net.backbone.pos.requires_grad_(False)
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=3e-3)

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x0 = torch.randint(mask_id, (n, L // 2)).repeat_interleave(2, dim=1)
        side = torch.randint(2, (n, L // 2))  # which token of each pair is masked
        masked = torch.zeros(n, L, dtype=torch.bool)
        masked[:, 0::2], masked[:, 1::2] = side == 0, side == 1
        return x0, masked

    for _ in range(steps):
        x0, masked = batch(64)
        logits = net(x0.masked_fill(masked, mask_id))
        loss = torch.nn.functional.cross_entropy(logits[masked], x0[masked])
        opt.zero_grad()
        loss.backward()
        opt.step()
    x0, masked = batch(256)
    with torch.no_grad():
        pred = net(x0.masked_fill(masked, mask_id)).argmax(-1)
    return (pred[masked] == x0[masked]).float().mean().item()


def test_rope_lets_a_masked_token_read_its_neighbour():
    # Without positions the answer is one of the row's 6 pair tokens at best (~1/6); RoPE's
    # relative positions find the partner.
    assert _pair_task_accuracy("learned") < 0.4
    assert _pair_task_accuracy("rope") > 0.9


def test_rope_backbone_has_no_position_table_and_sees_order():
    from diladiff.nets.transformer import Backbone

    torch.manual_seed(0)
    net = Backbone(16, 1, 2, max_len=8, positions="rope")
    assert net.pos is None
    h = torch.randn(1, 5, 16)
    swapped = h[:, [1, 0, 2, 3, 4]]
    # Attention weights depend on offsets: swapping two inputs changes what the others read.
    assert not torch.allclose(net(h)[0, 2:], net(swapped)[0, 2:], atol=1e-4)
    with pytest.raises(ValueError, match="exceeds max_len"):
        net(torch.randn(1, 9, 16))
    with pytest.raises(ValueError, match="unknown positions"):
        Backbone(16, 1, 2, max_len=8, positions="alibi")


def test_rope_rotates_queries_and_keys_by_their_position_and_leaves_values_alone(monkeypatch):
    from diladiff.nets import transformer

    torch.manual_seed(0)
    net = transformer.Backbone(16, 1, 2, max_len=8, positions="rope")
    seen = []
    real = transformer.attention

    def spy(q, k, v, backend):
        seen.append((q, k))
        return real(q, k, v, backend)

    monkeypatch.setattr(transformer, "attention", spy)
    row = torch.randn(1, 1, 16).expand(1, 6, 16)  # the same vector at every position
    out = net(row)
    # Identical values at every position: the output cannot depend on the position.
    assert torch.allclose(out[0], out[0, :1].expand(6, -1), atol=1e-6)
    # Scores between positions i and j depend on j - i only (Toeplitz), and do depend on it.
    q, k = seen[0]
    scores = (q @ k.transpose(-2, -1))[0, 0]
    for offset in range(-5, 6):
        diagonal = torch.diagonal(scores, offset)
        assert torch.allclose(diagonal, diagonal[:1].expand_as(diagonal), atol=1e-5)
    assert (scores.diagonal(0)[0] - scores.diagonal(1)[0]).abs() > 1e-3
    with pytest.raises(ValueError, match="even head width"):
        transformer.Backbone(18, 1, 2, max_len=8, positions="rope")
