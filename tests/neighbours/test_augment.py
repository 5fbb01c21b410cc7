"""The embedder's training views: the optional copy edits (rotation, overlay) and defaults that stay as shipped."""

from __future__ import annotations

import torch

from scanner.neighbours.augment import _affine_crop, _overlay, augment


def test_optional_edits_off_draw_nothing_extra():
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    a = augment(x, g1)
    b = augment(x, g2, flip_p=0.0, max_rotate_deg=0.0, overlay_p=0.0)
    torch.testing.assert_close(a, b)
    assert torch.equal(g1.get_state(), g2.get_state())  # the shipped views and the generator stream unchanged


def test_rotation_turns_the_view_by_the_drawn_angle():
    # theta maps output to input coordinates: unrotated input = A p0 + t, rotated input = R A p1 + t, so a spot seen
    # at p0 without the rotation is seen at p1 = A^-1 R^-1 A p0 with it (same generator: same crop draws).
    s, b = 32, 6
    x = torch.zeros(b, 1, s, s)
    x[:, :, 14:17, 22:25] = 1.0  # a 3x3 blob right of the centre
    out0 = _affine_crop(x, torch.Generator().manual_seed(3), 1.0, 0.0, 0.0, max_rotate_deg=0.0)
    out1 = _affine_crop(x, torch.Generator().manual_seed(3), 1.0, 0.0, 0.0, max_rotate_deg=40)
    replay = torch.Generator().manual_seed(3)
    draws = [torch.rand(b, generator=replay) for _ in range(8)]  # area, aspect, tx (2), ty (2), flip, angle
    aspect = torch.exp((draws[1] - 0.5) * 0.4)
    sx, sy = aspect.sqrt().clamp(max=1), (1 / aspect).sqrt().clamp(max=1)
    angle = torch.deg2rad(40 * (2 * draws[7] - 1))
    grid = (2 * torch.arange(s, dtype=torch.float32) + 1) / s - 1  # align_corners=False coordinates
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")

    def centroid(img):
        w = img.clamp(min=0)
        return torch.stack([(w * xx).sum() / w.sum(), (w * yy).sum() / w.sum()])

    for i in range(b):
        a_mat = torch.diag(torch.stack([sx[i], sy[i]]))
        c, sn = angle[i].cos(), angle[i].sin()
        r_inv = torch.stack([torch.stack([c, sn]), torch.stack([-sn, c])])
        want = torch.linalg.inv(a_mat) @ r_inv @ a_mat @ centroid(out0[i, 0])
        assert (centroid(out1[i, 0]) - want).abs().max() < 0.05, (i, float(torch.rad2deg(angle[i])))
    assert (out1 - out0).abs().max() > 0.5  # the rotation moved the blob


def test_overlay_marks_a_corner_of_the_chosen_images_only():
    x = torch.full((8, 3, 32, 32), 0.5)
    out = _overlay(x, torch.Generator().manual_seed(0), p=1.0)
    for img in out:
        changed = (img != 0.5).any(0)
        assert 0.01 < changed.float().mean() < 0.2
        ys, xs = torch.nonzero(changed, as_tuple=True)
        assert (ys.min() == 0 or ys.max() == 31) and (xs.min() == 0 or xs.max() == 31)  # touches a corner's edges
    torch.testing.assert_close(_overlay(x, torch.Generator().manual_seed(0), p=0.0), x)
