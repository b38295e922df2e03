"""The lateral radiograph of a scene: anterior to the image left, spine to the right.

Findings of the study show here too (an effusion fills the posterior costophrenic sulcus), so the
frontal and lateral images of one study share their pathology.
"""

from __future__ import annotations

import math

import numpy as np

from .anatomy import LOBE_LATERAL
from .raster import VES_A, VES_R, Ctx, Splat, bump, gauss2, ramp, vessel_lookup
from .scene import Scene, blob_opacity, box, effusion_density, effusion_height, patchy


def lateral(sc: Scene, ctx: Ctx, splat: Splat) -> np.ndarray:
    """Lateral view: anterior to the image left, spine to the right."""
    an, st, s = sc.an, sc.st, sc.s
    xa, ya, e1 = ctx.x, ctx.y, ctx.e1
    D = an.depth
    insp = st.inspiration
    # body: a rounded box (chest + abdomen); raised arms cover the top
    ex = (xa - 0.03) * (1 / (D + an.margin))
    ey = (ya - 0.25) * (1 / 1.3)
    ex2, ey2 = ex * ex, ey * ey
    be = 0.5 * (ex2 + ex2 * ex2) + 0.35 * ey2 + 0.65 * ey2 * ey2
    body = ramp((1.0 - be) * 0.5 * D, e1)
    A = 1.55 * body * (0.45 + 0.55 * np.sqrt(np.clip(1.0 - be, 0, 1)))
    wa = ctx.win(0.0, -0.95, 0.8, 0.4)
    if wa:
        A[wa] += 0.75 * gauss2(ctx.x[wa] + 0.05, ctx.y[wa] + 0.95, 0.6, 0.22)
    # lungs (both superimposed)
    yc = 0.30
    Hc = yc - an.apex
    Dl = D - 0.07
    e = ((xa - 0.03) * (1 / Dl)) ** 2 + ((ya - yc) * (1 / Hc)) ** 2
    dcage = (1.0 - np.sqrt(e)) * Dl
    cage = ramp(dcage, e1)
    x_st = -D + 0.09 + 0.07 * (ya + 0.7)
    ante = ramp(xa - (x_st + 0.03), e1)
    top_r = an.dome_r - 0.04 + insp
    top_l = top_r + an.dome_l
    if s["Atelectasis"] > 0:
        top_r -= 0.03 * s["Atelectasis"]
    xc = -0.12
    qd = (xa - xc) * (1 / D)
    qd = qd * qd
    above = 0.5 * (ramp(top_r + 0.26 * qd - ya, e1) + ramp(top_l + 0.26 * qd - ya, e1))
    # heart: anterior, inferior, resting on the diaphragm
    ctr = an.ctr
    if s["Cardiomegaly"] > 0:
        ctr = 0.52 + 0.14 * s["Cardiomegaly"] if s["Cardiomegaly"] >= 0.3 else 0.505
    ha, hb = 0.7 * ctr * D / 0.66, 0.24
    hx, hy = -0.45 * D + 0.5 * (ha - 0.31), top_l - 0.1
    tilt = -0.55
    heart = np.zeros_like(xa)
    wh = ctx.win(hx, hy, ha + 0.05, ha + 0.05)
    if wh:
        cx, cy = ctx.x[wh] - hx, ctx.y[wh] - hy
        xr = (math.cos(tilt) * cx + math.sin(tilt) * cy) * (1 / ha)
        yr = (math.cos(tilt) * cy - math.sin(tilt) * cx) * (1 / hb)
        heart[wh] = ramp((1.0 - np.sqrt(xr * xr + yr * yr)) * hb, e1 * 1.5)
    # aorta: ascending, arch, descending (a soft-tissue tube)
    aorta = np.zeros_like(xa)
    wao = ctx.win(0.06, 0.0, 0.3, 0.5)
    if wao:
        X, Y = ctx.x[wao], ctx.y[wao]
        ar = np.sqrt((X - 0.06) ** 2 + (Y + 0.3) ** 2)
        arch = ramp(0.035 - np.abs(ar - 0.18), e1) * ramp(-0.3 - Y, e1)
        desc = ramp(0.04 - np.abs(X - 0.24 - 0.02 * Y), e1) * ramp(Y + 0.3, e1) * ramp(0.35 - Y, 0.1)
        asc = ramp(0.045 - np.abs(X + 0.12), e1) * ramp(Y + 0.3, e1) * ramp(-0.05 - Y, 0.05)
        aorta[wao] = np.clip(arch + desc + asc, 0, 1)
    lung = cage * ante * above * (1.0 - 0.55 * heart) * (1.0 - 0.15 * aorta)
    air = lung * (0.75 + 0.25 * np.sqrt(np.clip(1.0 - e, 0, 1)))
    A += 0.08 * heart
    wt = ctx.win(0.06, -0.65, 0.15, 0.45)
    if wt:   # trachea
        tdx = ctx.x[wt] - 0.12 * (ctx.y[wt] + 1.0)
        A[wt] -= 0.3 * ramp(0.035 - np.abs(tdx), e1) * ramp(-0.2 - ctx.y[wt], 0.03)
    gx, gy, gr = an.gastric
    if gr > 0:
        wg = ctx.win(-0.3, top_l + 0.2 + gy, gr * 1.4 + 0.02, gr + 0.02)
        if wg:
            A[wg] -= 0.4 * ramp(gr - np.sqrt(((ctx.x[wg] + 0.3) * 0.7) ** 2 + (ctx.y[wg] - (top_l + 0.2 + gy)) ** 2), 0.02)
    # findings
    O = np.zeros_like(xa)
    F = np.zeros_like(xa)
    if s["Pleural Effusion"] > 0:   # fluid fills the posterior costophrenic sulcus, meniscus rising posteriorly
        sv = s["Pleural Effusion"]
        amount = 1.0 if an.effusion_side == "bilateral" else 0.75
        x_post = 0.03 + Dl
        post = np.clip((xa + 0.1) * (1 / (x_post + 0.1)), 0, 1)
        y_sulc = top_l + 0.26 * ((x_post - xc) / D) ** 2
        level = y_sulc - (0.03 + effusion_height(sv))
        ymen = level + (0.35 + 0.3 * sv) * (1 - post) ** 2 - 0.05 * post
        F += (amount * effusion_density(sv)) * ramp(dcage + 0.01, e1) * ramp(ya - ymen, 0.04) * ante * (0.6 + 0.4 * ramp(ya - ymen, 0.3))
    if s["Edema"] > 0:
        O += s["Edema"] * (0.55 * gauss2(xa - 0.05, ya + 0.02, 0.3, 0.3) * (0.7 + 0.3 * patchy(sc, xa, ya, 8, 'edema')) + 0.12)
    lobe_sev = max(s["Consolidation"], 0.8 * s["Pneumonia"])
    if lobe_sev > 0:
        lx, ly = LOBE_LATERAL[an.lobe]
        blob_opacity(sc, ctx, O, lx, ly, 0.2, 0.18, lobe_sev, 'lobe')
    if s["Lung Opacity"] > 0:
        lx, ly = LOBE_LATERAL[an.opacity_lobe]
        blob_opacity(sc, ctx, O, lx, ly, 0.16, 0.14, s["Lung Opacity"], 'opacity', n=12, base=0.4, gain=0.8, thr=0.2)
    if s["Atelectasis"] > 0:
        _, y0, ang = an.atel
        wl = ctx.win(0.15, y0, 0.3, 0.15)
        if wl:
            du, dy = ctx.x[wl] - 0.15, ctx.y[wl] - y0
            c, sn = math.cos(ang * 0.5), math.sin(ang * 0.5)
            O[wl] += s["Atelectasis"] * bump(dy * c - du * sn, 0.018 + 0.02 * s["Atelectasis"]) * ramp(0.2 - np.abs(du * c + dy * sn), 0.06)
    if s["Lung Lesion"] > 0:
        _, _, ly, lz = an.lesion
        rad = 0.02 + 0.1 * min(s["Lung Lesion"], 1.0)
        wl = ctx.win(lz, ly, rad + 0.03, rad + 0.03)
        if wl:
            A[wl] += 0.3 * ramp(rad - np.sqrt((ctx.x[wl] - lz) ** 2 + (ctx.y[wl] - ly) ** 2), 0.012) * (1.0 if s["Lung Lesion"] > 0.15 else 0.5)
    np.clip(O, 0, 1, out=O)
    np.clip(F, 0, 1, out=F)
    hyl = -0.06 - 0.5 * insp
    mark = 0.12 * vessel_lookup(sc.vessels, np.abs(xa - 0.08) + 0.2, ya, 0.2, hyl, (xa > 0.08).astype(np.int32) * (VES_A * VES_R)) \
        + 0.35 * gauss2(xa - 0.08, ya - hyl, 0.08, 0.1)
    A += 0.4 * O * lung - 1.1 * air * (1.0 - O) * (1.0 - F) + 0.15 * F * cage + mark * lung * (1.0 - O)
    # bones: sternum, vertebral bodies + posterior elements, faint posterior ribs
    ws = ctx.win(-D + 0.1, -0.2, 0.15, 0.6)
    if ws:
        X, Y = ctx.x[ws], ctx.y[ws]
        A[ws] += 0.35 * ramp(0.022 - np.abs(X - (-D + 0.09 + 0.07 * (Y + 0.7))), e1) * ramp(Y + 0.72, 0.02) * ramp(0.28 - Y, 0.03)
    wv = ctx.win(0.62 * D + 0.12, 0, 0.3, 1.3)
    if wv:
        X, Y = ctx.x[wv], ctx.y[wv]
        x_sp = 0.62 * D + 0.06 * (Y + 0.1) ** 2 - 0.03 * Y
        vph = (Y + 1.0) * (1 / 0.105) + an.rib_phase
        vf = vph - np.floor(vph)
        inbody = ramp(0.085 - np.abs(X - x_sp), e1)
        vb = inbody * (1.0 - 0.6 * bump(vf - 0.5, 0.1) + 0.2 * bump(vf - 0.42, 0.06))
        post = ramp(0.045 - np.abs(X - x_sp - 0.17), 0.02) * (0.6 + 0.4 * bump(vf - 0.3, 0.3))
        A[wv] += (0.32 * vb + 0.18 * post) * ramp(0.7 - Y, 0.1)
    rph = (ya + 0.4 * (xa - 0.2)) * (1 / (an.rib_sp * 0.9)) + an.rib_phase
    A += 0.08 * bump(rph - np.floor(rph) - 0.25, 0.18) * cage * ramp(xa - 0.05, 0.2)
    _patient_marks(sc, ctx, splat, A, D)
    _lateral_devices(sc, ctx, splat, A, D)
    return A


def _patient_marks(sc: Scene, ctx: Ctx, splat: Splat, A, D):
    """The patient's granuloma (projected) and sternotomy wires (across the sternum) on the lateral film."""
    an = sc.an
    if an.granuloma:
        _, _, gy, gz, gr = an.granuloma
        wg = ctx.win(gz, gy, gr + 0.02, gr + 0.02)
        if wg:
            A[wg] += 0.5 * ramp(gr - np.sqrt((ctx.x[wg] - gz) ** 2 + (ctx.y[wg] - gy) ** 2), 0.008)
    for k in range(an.sternotomy):
        y = -0.48 + 0.1 * k
        xs = -D + 0.09 + 0.07 * (y + 0.7)   # the sternum line
        splat.line([(xs - 0.035, y - 0.01), (xs, y + 0.012), (xs + 0.035, y - 0.01)], 0.55)


def _lateral_devices(sc: Scene, ctx: Ctx, splat: Splat, A, D):
    for d in sc.devices:
        if d == "ett":
            pts = [(0.0, -1.1), (0.05, -0.7), (0.08, -0.35)]
            splat.line(pts, 0.25, 0.035)
            splat.line(pts, 0.5, offset=0.012)
        elif d == "ng":
            splat.line([(0.12, -1.1), (0.2, -0.5), (0.18, 0.2), (-0.1, 0.55), (-0.3, 0.6)], 0.55)
        elif d == "cline":
            splat.line([(0.0, -1.1), (-0.05, -0.6), (-0.12, -0.3), (-0.14, -0.1)], 0.6)
        elif d == "pacemaker":
            gx, gy = -D + 0.02, -0.6
            box(ctx, A, gx, gy, 0.035, 0.07, 1.3)
            splat.line([(gx + 0.03, gy), (-0.2, -0.5), (-0.15, -0.2), (-0.2, 0.05), (-0.35, 0.3)], 0.6)
            splat.line([(gx + 0.03, gy + 0.02), (-0.2, -0.45), (-0.13, -0.2), (-0.1, 0.0)], 0.6)
        elif d == "chest_tube":
            pts = [(D * 0.8, 0.45), (D * 0.55, 0.2), (D * 0.35, -0.2), (0.1, -0.6)]
            splat.line(pts, 0.2, 0.03)
            splat.line(pts, 0.45, offset=0.012)
            splat.line(pts, 0.45, offset=-0.012)
