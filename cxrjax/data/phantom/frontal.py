"""The frontal (PA / AP / supine AP) radiograph of a scene: body, lungs, heart, findings, bones, devices.

Returns the attenuation map of one tile of rows (bright = dense); `render.render_image` turns it into
a radiograph. Finding sizes scale with their severity: a small effusion only blunts the costophrenic
angle, a large one rises to the mid zone with a meniscus.
"""

from __future__ import annotations

import math

import numpy as np

from .anatomy import LOBE_FRONTAL
from .raster import VES_A, VES_R, Ctx, Splat, bump, gauss2, ramp, vessel_lookup
from .scene import Scene, blob_opacity, box, effusion_density, effusion_height, patchy


def frontal(sc: Scene, ctx: Ctx, splat: Splat) -> np.ndarray:
    an, st, s = sc.an, sc.st, sc.s
    xa, ya, e1, px = ctx.x, ctx.y, ctx.e1, ctx.px
    ap = sc.view != "PA"
    ax = np.abs(xa)
    right = (xa < 0).astype(np.float32)   # the patient's right lung (image left)
    W = an.W
    Wb = W + an.margin
    # --- body and soft tissue
    wb_y = Wb * (1.0 + 0.06 * ya)
    q = ax / wb_y
    chord = np.sqrt(np.clip(1.0 - q * q, 0, 1))
    shoulder = an.shoulder_y + 0.1 + 0.22 * q * q
    trunk = ramp((1.0 - q) * Wb, e1) * ramp(ya - shoulder, 0.04)
    A = 1.35 * trunk * (0.3 + 0.7 * chord)
    wn = ctx.win(0, -0.9, 0.22, 0.25)
    if wn:
        X, Y = ctx.x[wn], ctx.y[wn]
        qn = np.abs(X) * (1 / 0.17)
        A[wn] += 0.75 * np.sqrt(np.clip(1 - qn * qn, 0, 1)) * ramp(-0.5 - Y, 0.3) * (1 - trunk[wn])
    for sd in (-1, 1):   # humeral heads
        hx_, hy_ = sd * (Wb - 0.02), an.shoulder_y + 0.3
        wh = ctx.win(hx_, hy_ + 0.1, 0.3, 0.4)
        if wh:
            X, Y = ctx.x[wh], ctx.y[wh]
            dh = np.sqrt((X - hx_ - sd * 0.02) ** 2 + (Y - hy_ + 0.02) ** 2)
            A[wh] += 0.3 * ramp(0.1 - dh, 0.02) * trunk[wh]
    if an.sex == "F":
        for sd in (-1, 1):
            wb = ctx.win(sd * 0.5 * W / 0.72, 0.45, 0.5, 0.42)
            if wb:
                X, Y = ctx.x[wb], ctx.y[wb]
                A[wb] += 0.2 * gauss2(X - sd * 0.5 * W / 0.72, Y - 0.38, 0.26, 0.22) * ramp(0.62 - Y + 0.1 * np.abs(X), 0.05)
    # --- rib cage, diaphragm, mediastinum, heart
    yc = 0.30
    Hc = yc - an.apex
    e = (xa * (1 / W)) ** 2 + ((ya - yc) * (1 / Hc)) ** 2
    dcage = (1.0 - np.sqrt(e)) * W
    cage = ramp(dcage, e1)
    insp = st.inspiration
    dome_l = an.dome_r + an.dome_l + insp
    dome_r = an.dome_r + insp
    if s["Atelectasis"] > 0:   # volume loss lifts the hemidiaphragm
        if an.atel_side < 0:
            dome_r -= 0.06 * s["Atelectasis"]
        else:
            dome_l -= 0.06 * s["Atelectasis"]
    dome_top = dome_l + (dome_r - dome_l) * right
    ucen = 0.45 * W
    qd = (ax - ucen) * (1 / (0.55 * W))
    ydia = dome_top + an.dome_h * qd * qd
    above = ramp(ydia - ya, e1)
    ecm = s["Enlarged Cardiomediastinum"]
    wmed = an.wmed + 0.06 * ecm + 0.025 * ramp(-0.5 - ya, 0.2)
    medial = ramp(np.abs(xa - 0.015) - wmed, e1)
    ctr = an.ctr
    if s["Cardiomegaly"] > 0:
        ctr = 0.52 + 0.14 * s["Cardiomegaly"] if s["Cardiomegaly"] >= 0.3 else 0.505
    ctr *= 1.07 if ap else 1.0
    tilt, ratio = an.heart_tilt, 0.72
    ha = ctr * W / math.sqrt(math.cos(tilt) ** 2 + (ratio * math.sin(tilt)) ** 2)
    hb = ratio * ha
    hx = an.heart_x + 0.02 * s["Cardiomegaly"]
    hy = dome_l - 0.55 * hb
    heart = np.zeros_like(xa)
    wh = ctx.win(hx, hy, ha * 1.05 + 0.02, ha * 1.05 + 0.02)
    if wh:
        cx, cy = ctx.x[wh] - hx, ctx.y[wh] - hy
        ct, stn = math.cos(tilt), math.sin(tilt)
        xr, yr = (ct * cx + stn * cy) * (1 / ha), (ct * cy - stn * cx) * (1 / hb)
        heart[wh] = ramp((1.0 - np.sqrt(xr * xr + yr * yr)) * hb, e1 * 1.5)
    lung = cage * above * medial * (1.0 - 0.75 * heart)
    kx, ky = an.wmed + 0.01 + 0.03 * ecm, -0.33
    wk = ctx.win(kx, ky, 0.08, 0.08)
    if wk:
        knob = ramp(0.06 + 0.01 * ecm - np.sqrt((ctx.x[wk] - kx) ** 2 + (ctx.y[wk] - ky) ** 2), e1)
        lung[wk] *= 1.0 - knob
        A[wk] += 0.1 * knob
    qq = (ax - ucen) * (1 / (0.6 * W))
    air = lung * (0.8 + 0.2 * np.sqrt(np.clip(1.0 - qq * qq, 0.05, 1)))
    A += 0.18 * heart
    gx, gy, gr = an.gastric   # gastric bubble under the left dome
    if gr > 0:
        wg = ctx.win(gx, dome_l + gy, gr * 1.4 + 0.02, gr + 0.02)
        if wg:
            A[wg] -= 0.45 * ramp(gr - np.sqrt(((ctx.x[wg] - gx) * 0.7) ** 2 + (ctx.y[wg] - (dome_l + gy)) ** 2), 0.02)
    # trachea and main bronchi (air)
    carina_y = -0.24
    wt = ctx.win(0, -0.65, 0.25, 0.5)
    if wt:
        X, Y = ctx.x[wt], ctx.y[wt]
        tr = ramp(0.032 - np.abs(X - 0.01 * (Y + 0.3)), e1) * ramp(carina_y - Y, 0.03)
        for sd in (-1, 1):
            d = np.abs((Y - carina_y) - 0.9 * sd * X) * (1 / 1.35)
            tr = np.maximum(tr, ramp(0.022 - d, e1) * ramp(sd * X, e1) * ramp(0.2 - sd * X, 0.04))
        A[wt] -= 0.35 * tr
    # --- findings -> O (opacity replacing lung air), F (pleural fluid)
    O = np.zeros_like(xa)
    F = np.zeros_like(xa)
    if s["Pleural Effusion"] > 0:
        sv = s["Pleural Effusion"]
        for sd in {"right": (-1,), "left": (1,), "bilateral": (-1, 1)}[an.effusion_side]:
            dt = dome_r if sd < 0 else dome_l
            y_cp = dt + an.dome_h + 0.02
            if sc.view == "AP_SUPINE":   # layering: a veil over the hemithorax, denser below
                top = -0.9
            else:
                top = y_cp - (0.2 + effusion_height(sv))
            wf = ctx.win(sd * 0.5, (top + y_cp + 0.1) / 2, 0.55, (y_cp + 0.1 - top) / 2 + 0.05)
            if wf is None:
                continue
            X, Y = ctx.x[wf], ctx.y[wf]
            on = ramp(sd * X, e1) * ramp(dcage[wf] + 0.01, e1)
            if sc.view == "AP_SUPINE":
                F[wf] += on * ramp(ydia[wf] + 0.05 - Y, e1) * 0.5 * sv * (0.35 + 0.65 * ramp(Y + 0.4, 1.0))
            else:
                qx = np.abs(X) * (1 / W)
                level = y_cp - effusion_height(sv)    # small / uncertain: costophrenic blunting only
                ymen = level - (0.05 + 0.2 * sv) * qx * qx * qx   # the meniscus rises laterally
                grade = (0.6 + 0.4 * ramp(Y - ymen, 0.3)) * effusion_density(sv)
                F[wf] += on * ramp(Y - ymen, 0.05) * ramp(y_cp + 0.1 - Y, 0.05) * grade
    if s["Edema"] > 0:
        sv = s["Edema"]
        bat = gauss2(ax - 0.24, ya + 0.02, 0.22, 0.3)
        kerley = bump(np.mod(ya * 28.0, 1.0) - 0.5, 0.12) * ramp(ax - (W - 0.14), 0.02) * ramp(ya - 0.05, 0.05)
        O += sv * (0.65 * bat * (0.7 + 0.3 * patchy(sc, xa, ya, 8, 'edema')) + 0.12 + 0.25 * kerley)
    lobe_sev = max(s["Consolidation"], 0.8 * s["Pneumonia"])
    if lobe_sev > 0:
        sd, lu, ly = LOBE_FRONTAL[an.lobe]
        w = blob_opacity(sc, ctx, O, sd * lu, ly, 0.2, 0.17, lobe_sev, 'lobe', mask_side=sd)
        if w:   # air bronchograms: dark branching lines inside the opacity
            bron = vessel_lookup(sc.vessels, ax[w], ctx.y[w], 0.12, -0.1, ((1.0 - right[w]) * (VES_A * VES_R)).astype(np.int32))
            O[w] *= 1.0 - np.clip(3.0 * bron, 0, 0.6)
    if s["Lung Opacity"] > 0:
        sd, lu, ly = LOBE_FRONTAL[an.opacity_lobe]
        blob_opacity(sc, ctx, O, sd * lu, ly, 0.16, 0.14, s["Lung Opacity"], 'opacity', n=12, base=0.4, gain=0.8, thr=0.2, mask_side=sd)
    if s["Atelectasis"] > 0:
        sd = an.atel_side
        u0, y0, ang = an.atel
        wa = ctx.win(sd * u0, y0, 0.26, 0.14)
        if wa:
            du, dy = sd * ctx.x[wa] - u0, ctx.y[wa] - y0
            along = du * math.cos(ang) + dy * math.sin(ang)
            perp = dy * math.cos(ang) - du * math.sin(ang)
            O[wa] += s["Atelectasis"] * 1.2 * bump(perp, 0.018 + 0.02 * s["Atelectasis"]) * ramp(0.17 - np.abs(along), 0.06)
    if s["Lung Lesion"] > 0:
        sd, lu, ly, _ = an.lesion
        rad = 0.02 + 0.1 * min(s["Lung Lesion"], 1.0)
        wl = ctx.win(sd * lu, ly, rad * 1.3 + 0.02, rad * 1.3 + 0.02)
        if wl:
            dx_, dy_ = ctx.x[wl] - sd * lu, ctx.y[wl] - ly
            dist = np.sqrt(dx_ * dx_ + dy_ * dy_)
            if rad > 0.06:   # lobulated mass
                dist = dist * (1.0 + 0.1 * np.cos(3 * np.arctan2(dy_, dx_ + 1e-6)))
            A[wl] += 0.35 * ramp(rad - dist, 0.012) * (1.0 if s["Lung Lesion"] > 0.15 else 0.5)
    if s["Pleural Other"] > 0:
        sd = an.po_side
        wp = ctx.win(sd * 0.45, -0.55, 0.45, 0.35)
        if wp:
            O[wp] += s["Pleural Other"] * 1.5 * ramp(0.035 - dcage[wp], 0.02) * ramp(-0.35 - ctx.y[wp], 0.15) * ramp(sd * ctx.x[wp], e1)
    np.clip(O, 0, 1, out=O)
    # --- lung markings (vessels) and hila
    hyl = -0.06 - 0.5 * insp
    ves = vessel_lookup(sc.vessels, ax, ya, 0.2, hyl, ((1.0 - right) * (VES_A * VES_R)).astype(np.int32))
    hil = gauss2(ax - 0.2, ya - hyl, 0.06, 0.09)
    mark = (0.22 + 0.12 * s["Edema"]) * ves + 0.3 * hil
    if s["Pneumothorax"] > 0:   # a pleural air rim without markings, bounded by the visceral pleural line
        sd = an.ptx_side
        dp = (0.03 + 0.2 * s["Pneumothorax"]) * (0.35 + 0.65 * ramp(0.1 - ya, 0.6))
        on = lung * ramp(sd * xa, e1)
        ptx = on * ramp(dp - dcage, e1)
        mark = mark * (1.0 - ptx)
        A += 0.22 * on * bump(dcage - dp, max(px, 0.004)) * ramp(0.25 - ya, 0.2) - 0.08 * ptx
    A += 0.4 * O * lung - 1.05 * air * (1.0 - O) * (1.0 - F) + 0.15 * F * cage + mark * lung * (1.0 - O)
    # --- bones: posterior and anterior ribs, clavicles, scapulae, spine
    u = ax * (1 / W)
    g = ya - an.rib_arch * (u - 0.3) ** 2 + 1.05
    phi = (g - 0.08 * g * g) * (1 / an.rib_sp) + an.rib_phase
    fsd = an.fracture_side
    wfr = None
    if s["Fracture"] > 0:
        # the centre of rib k is where phi = k + rib_w / 2; shift one side of a short segment (a step)
        k = an.fracture_rib + 0.5 * an.rib_w - an.rib_phase
        gk = (1 - math.sqrt(max(1 - 0.32 * k * an.rib_sp, 0))) / 0.16
        yk = gk - 1.05 + an.rib_arch * (an.fracture_u - 0.3) ** 2
        wfr = ctx.win(fsd * an.fracture_u * W, yk, 0.1, 0.08)
        if wfr:
            uu = u[wfr]
            win = gauss2(uu - an.fracture_u, ctx.y[wfr] - yk, 0.06, 0.05) * ramp(fsd * ctx.x[wfr], e1)
            phi[wfr] += 0.22 * s["Fracture"] * win * np.sign(uu - an.fracture_u)
    fr = phi - np.floor(phi)
    tt = fr * (1 / an.rib_w)
    inb = tt < 1.0
    band = np.clip(np.minimum(tt, 1.0 - tt) * 7.0, 0, 1)
    rib = (0.7 * band + 0.3 * (bump(tt - 0.1, 0.1) + bump(tt - 0.9, 0.1))) * inb
    if s["Fracture"] > 0 and wfr:
        gap = bump(u[wfr] - an.fracture_u, 0.012 / W) * ramp(fsd * ctx.x[wfr], e1) * ramp(0.05 - np.abs(ctx.y[wfr] - yk), 0.02)
        rib[wfr] *= 1.0 - 0.9 * gap * min(1.0, 2 * s["Fracture"])
    ribzone = ramp(dcage + 0.05, 0.02) * ramp(0.62 - ya, 0.1) * ramp(ax - 0.05, 0.04)
    ga = ya + 0.3 * u - 0.15 * u * u + 1.2
    phia = (ga - 0.05 * ga * ga) * (1 / (an.rib_sp * 1.15)) + 0.3 + an.rib_phase
    arib = bump(phia - np.floor(phia) - 0.2, 0.15) * ramp(u - 0.3, 0.15) * ramp(0.45 - ya, 0.1)
    A += (0.3 * rib + 0.1 * arib) * ribzone
    cl_y = an.clav_y - (0.06 if ap else 0.0)
    wc = ctx.win(0, cl_y - 0.1, 0.8, 0.16)
    if wc:
        X, Y = np.abs(ctx.x[wc]), ctx.y[wc]
        ycl = cl_y - 0.38 * X + 0.22 * X * X
        tcl = 0.026 + 0.016 * np.clip(1.0 - X * (1 / 0.7), 0, 1)
        A[wc] += 0.4 * ramp(tcl - np.abs(Y - ycl), e1) * ramp(X - 0.05, 0.02) * ramp(0.74 - X, 0.03)
    if ap:   # scapulae project over the upper lungs on AP views
        us = W - 0.16 + 0.14 * (ya + 0.85)
        A += 0.16 * ramp(ax - us, 0.02) * ramp(-0.05 - ya, 0.1) * ramp(ya + 0.9, 0.05) * ramp(Wb - ax, e1)
    ws = ctx.win(0, 0, 0.1, 1.2)
    if ws:
        X, Y = ctx.x[ws], ctx.y[ws]
        vph = (Y + 1.0) * (1 / 0.1) + an.rib_phase
        vf = vph - np.floor(vph)
        body = ramp(0.065 - np.abs(X), e1) * (1.0 - 0.5 * bump(vf - 0.5, 0.12))
        ped = gauss2(np.abs(X) - 0.05, vf - 0.3, 0.014, 0.14)
        A[ws] += (0.3 * body + 0.15 * ped) * trunk[ws]
    _patient_marks(sc, ctx, splat, A)
    _frontal_devices(sc, ctx, splat, A, W, Wb)
    return A


def _patient_marks(sc: Scene, ctx: Ctx, splat: Splat, A):
    """Marks a patient carries on every film: a calcified granuloma, sternotomy wires."""
    an = sc.an
    if an.granuloma:
        sd, gx, gy, _, gr = an.granuloma
        wg = ctx.win(sd * gx, gy, gr + 0.02, gr + 0.02)
        if wg:
            A[wg] += 0.6 * ramp(gr - np.sqrt((ctx.x[wg] - sd * gx) ** 2 + (ctx.y[wg] - gy) ** 2), 0.008)
    for k in range(an.sternotomy):   # small twisted loops along the sternum
        cy = -0.48 + 0.1 * k
        loop = [(0.012 + 0.03 * math.cos(t), cy + 0.012 * math.sin(t)) for t in np.linspace(0, 2 * math.pi, 9)]
        splat.line(loop, 0.55)


def _frontal_devices(sc: Scene, ctx: Ctx, splat: Splat, A, W, Wb):
    an = sc.an
    for d in sc.devices:
        if d == "ett":
            pts = [(0.02, -1.1), (0.015, -0.7), (0.0, -0.38)]
            splat.line(pts, 0.25, 0.035)
            splat.line(pts, 0.5, offset=0.012)
        elif d == "ng":
            splat.line([(0.04, -1.1), (0.03, -0.4), (0.06, 0.1), (0.2, 0.55), (0.38, 0.62)], 0.55)
        elif d == "cline":
            if an.cline_side < 0:
                pts = [(-0.3, -1.1), (-0.18, -0.8), (-0.09, -0.55), (-0.07, -0.12)]
            else:
                pts = [(0.62, -0.72), (0.3, -0.64), (0.05, -0.5), (-0.06, -0.15)]
            splat.line(pts, 0.6)
        elif d == "pacemaker":
            sd = an.pm_side
            gx, gy = sd * (W * 0.7), -0.62
            box(ctx, A, gx, gy, 0.08, 0.055, 1.3)
            splat.line([(gx - sd * 0.05, gy), (sd * 0.25, -0.58), (-0.05, -0.35), (-0.12, 0.0), (-0.1, 0.12)], 0.6)
            splat.line([(gx - sd * 0.05, gy + 0.02), (sd * 0.25, -0.55), (-0.02, -0.3), (0.0, 0.05), (0.12, 0.28)], 0.6)
        elif d == "chest_tube":
            sd = an.ptx_side
            pts = [(sd * (Wb + 0.05), 0.4), (sd * (W - 0.08), 0.25), (sd * (W - 0.18), -0.15), (sd * 0.35, -0.58)]
            splat.line(pts, 0.2, 0.03)
            splat.line(pts, 0.45, offset=0.012)
            splat.line(pts, 0.45, offset=-0.012)

