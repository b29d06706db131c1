"""Latent -> observation decoders: shapes, determinism, differentiability, render geometry."""
import pytest
import torch

from toys.decoders import IdentityDecoder, RandomMLPDecoder, RenderDecoder, make_decoder


def test_identity():
    z = torch.randn(5, 2)
    assert torch.equal(IdentityDecoder()(z), z)
    assert make_decoder("identity", latent_dim=3).out_dim == 3


def test_random_mlp_shapes_determinism_and_smoothness():
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    d1 = RandomMLPDecoder(latent_dim=2, out_dim=12, hidden=32, depth=3, seed=7)
    d2 = make_decoder("random_mlp", latent_dim=2, out_dim=12, hidden=32, depth=3, seed=7)
    d3 = RandomMLPDecoder(latent_dim=2, out_dim=12, hidden=32, depth=3, seed=8)
    y = d1(z)
    assert y.shape == (64, 12)
    assert torch.equal(y, d2(z))
    assert float((y - d3(z)).abs().max()) > 0.1
    assert list(d1.parameters()) == []  # fixed: nothing to train
    assert 0.3 < float(y.std()) < 3.0  # unit-ish output scale
    # differentiable, and the Jacobian matches finite differences (smooth map)
    z0 = z[:1].double().requires_grad_(True)
    dd = d1.double()
    jac = torch.autograd.functional.jacobian(lambda v: dd(v)[0], z0)[:, 0, :]
    h = 1e-6
    fd = torch.stack([(dd(z0.detach() + h * e) - dd(z0.detach() - h * e))[0] / (2 * h) for e in torch.eye(2, dtype=torch.float64)], -1)
    assert torch.allclose(jac, fd, atol=1e-6)
    # distinct latents give distinct observations (no collapse)
    assert float(torch.cdist(y, y).add(torch.eye(64) * 1e3).min()) > 1e-3


def test_render_shapes_peak_and_gradient():
    r = RenderDecoder(size=16, blob_width=0.25, extent=2.0)
    z = torch.tensor([[0.0, 0.0], [1.0, 0.5], [-1.5, -1.0]])
    img = r(z)
    assert img.shape == (3, 256)
    img4 = make_decoder("render", flatten=False)(z)
    assert img4.shape == (3, 1, 16, 16) and torch.allclose(img4.reshape(3, -1), img)
    rows, cols = [], []
    for i in range(3):
        k = int(img[i].argmax())
        rows.append(k // 16)
        cols.append(k % 16)
    # pixel centres are -1.875 + 0.25 j; x = 1.0 -> column 11 or 12, y up = row index down
    exp_row, exp_col = r.pixel_of(z)
    assert rows == exp_row.tolist() and cols == exp_col.tolist()
    assert cols[1] > cols[0] > cols[2]  # moving right in x moves the peak right
    assert rows[1] < rows[0] < rows[2]  # moving up in y moves the peak up (smaller row)
    assert float(img.max()) <= 1.0 + 1e-6 and float(img.min()) >= 0.0
    # point exactly on a pixel centre gives peak value 1
    c = torch.tensor([[r.u[3].item(), r.v[9].item()]])
    one = r(c).reshape(16, 16)
    assert one[9, 3] == pytest.approx(1.0) and int(one.argmax()) == 9 * 16 + 3
    zg = z.clone().requires_grad_(True)
    r(zg).sum().backward()
    assert zg.grad is not None and float(zg.grad.abs().sum()) > 0


def test_registry_errors():
    with pytest.raises(ValueError, match="allowed"):
        make_decoder("vae")
    with pytest.raises(ValueError, match="allowed"):
        make_decoder("render", size=8, colour=1)
    with pytest.raises(ValueError, match="allowed"):
        RenderDecoder(latent_dim=3)
