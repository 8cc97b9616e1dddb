//! q8_0_r16 products of several activation rows on AMX-INT8 (Sapphire Rapids and later): the tile
//! multiply `tdpbssd` does the integer dot products of up to 16 activation rows with a group's 16
//! weight rows for one block of 32 values in one instruction, where the AVX-512 tile
//! (`simd::avx512`) spends one `vpdpbusd` plus one broadcast per 4 values of each activation row.
//!
//! The interleaved layout already is AMX's: one block column of a q8_0_r16 group holds 8 chunks of 64
//! bytes, chunk `c` being quants `4c..4c + 4` of each of the 16 rows, which is the `B` tile of a
//! `K = 32` product (8 rows of 16 x 4 bytes). The activations' block is the `A` tile (one row of 32
//! bytes per activation row, read in place with the row stride). Both are signed, so no bias is needed.
//! Each block's 16 x 16 integer dot products go to memory (`tilestored`) and are scaled and summed in
//! f32 exactly as the AVX-512 tile does (`acc += f32(dot) · (dw · dx)`): the dot products are exact
//! integers, so the results are bit for bit the AVX-512 kernel's.
//!
//! The tile registers are per thread state: each call configures them (`ldtilecfg`) and releases them
//! (`tilerelease`) before returning, so a context switch outside a call saves no tile data.

// Tiles index their register arrays by row.
#![allow(clippy::needless_range_loop)]

use std::arch::asm;
use std::arch::x86_64::*;

use crate::format::{Q8_0R16_GROUP_BYTES, QK8_0, R16};
use crate::quant::QuantizedActs;

/// Whether this CPU and OS run AMX-INT8: the CPU reports AMX-TILE and AMX-INT8, the OS saves the
/// tile state (XCR0 bits 17 and 18), and Linux granted this process the tile data state
/// (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`; without it the first tile instruction
/// faults). Asked once, by `Isa::available`.
pub(crate) fn available() -> bool {
    let leaf7 = __cpuid_count(7, 0);
    let (amx_tile, amx_int8) = (leaf7.edx & (1 << 24) != 0, leaf7.edx & (1 << 25) != 0);
    if !(amx_tile && amx_int8 && std::arch::is_x86_feature_detected!("xsave")) {
        return false;
    }
    // SAFETY: XSAVE was detected, and the OS enables XGETBV (OSXSAVE): `Isa::available` only asks
    // after detecting AVX-512, which needs the OS's XSAVE support.
    let xcr0 = unsafe { xcr0() };
    if xcr0 & (0b11 << 17) != 0b11 << 17 {
        return false;
    }
    request_tile_permission()
}

#[target_feature(enable = "xsave")]
unsafe fn xcr0() -> u64 {
    _xgetbv(0)
}

#[cfg(target_os = "linux")]
fn request_tile_permission() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with these arguments only changes this process's permitted xsave features.
    unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
}

#[cfg(not(target_os = "linux"))]
fn request_tile_permission() -> bool {
    false
}

/// Fewest activation rows a product takes through AMX. Per block of one group, single thread, hot
/// (`1280 -> 896`, Emerald Rapids): 4 rows 11 ns with AVX-512, 14 with AMX; 8 rows 20 vs 17; 16 rows
/// 39-41 vs 23-25; 256 rows 664-690 vs 450-500.
pub(crate) const MIN_ROWS: usize = 8;

/// The 64-byte tile configuration of `ldtilecfg` (palette 1): tile `t` has `rows[t]` rows of
/// `colsb[t]` bytes.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

/// Configures the tiles: tile `t` gets `shapes[t]` = (rows, bytes per row); the others none.
///
/// # Safety
/// AMX must be [`available`]; every shape at most 16 rows of at most 64 bytes.
pub(crate) unsafe fn configure_tiles(shapes: &[(u8, u16)]) {
    let mut c = TileConfig {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        colsb: [0; 16],
        rows: [0; 16],
    };
    for (t, &(rows, colsb)) in shapes.iter().enumerate() {
        (c.rows[t], c.colsb[t]) = (rows, colsb);
    }
    // SAFETY: AMX is available (the caller's contract); the configuration is valid (rows <= 16, colsb
    // <= 64).
    unsafe { asm!("ldtilecfg [{}]", in(reg) &c as *const TileConfig, options(nostack, readonly)) };
}

/// Tiles for `rows` activation rows: 0 and 3 hold the dot products of two groups (`rows` x 16 i32),
/// 1 the activations' block (`rows` x 32 bytes), 2 and 4 the two groups' blocks of weights (8 x 64
/// bytes).
///
/// # Safety
/// AMX must be [`available`].
unsafe fn load_config(rows: usize) {
    let (dots, acts, weights) = ((rows as u8, 64), (rows as u8, 32), (8, 64));
    configure_tiles(&[dots, acts, weights, dots, weights]);
}

/// `y[i · y_stride + k]` for the `m` activation rows and the `nrows` weight rows of `w` (q8_0_r16
/// groups), two groups and 16 activation rows at a time (the tiles are configured again whenever the
/// count of rows changes: at most twice per pair of groups, for the last, partial tile and back).
///
/// Two groups per pass: one group's block is a chain of dependent tile operations (zero, multiply,
/// store) whose latency, at 8 activation rows, was most of a block's time; two independent chains
/// overlap, and the activations' tile is loaded once for both.
///
/// # Safety
/// AMX-INT8 must be [`available`] and AVX-512 F/BW/VL and F16C detected; `w` must hold `nrows / 16`
/// groups of `acts.cols` values, `acts` at least `m` rows, and `y` must be valid for the writes.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(crate) unsafe fn gemv_q8_0_r16(
    w: &[u8],
    nrows: usize,
    acts: &QuantizedActs,
    m: usize,
    y: *mut f32,
    y_stride: usize,
) {
    let group_bytes = acts.cols / QK8_0 * Q8_0R16_GROUP_BYTES;
    let groups = nrows / R16;
    debug_assert!(nrows.is_multiple_of(R16) && w.len() >= groups * group_bytes);
    let mut configured = 0;
    let mut dots = [Dots([0; 16 * R16]), Dots([0; 16 * R16])];
    for g in (0..groups).step_by(2) {
        let pair = g + 1 < groups;
        let group = w.as_ptr().add(g * group_bytes);
        let mut first = 0;
        while first < m {
            let rows = (m - first).min(16);
            if rows != configured {
                load_config(rows);
                configured = rows;
            }
            let out = y.add(first * y_stride + g * R16);
            match (pair, rows > 8) {
                (true, true) => tile::<16, 2>(group, group_bytes, acts, first, rows, out, y_stride, &mut dots),
                (true, false) => tile::<8, 2>(group, group_bytes, acts, first, rows, out, y_stride, &mut dots),
                (false, true) => tile::<16, 1>(group, group_bytes, acts, first, rows, out, y_stride, &mut dots),
                (false, false) => tile::<8, 1>(group, group_bytes, acts, first, rows, out, y_stride, &mut dots),
            }
            first += rows;
        }
    }
    if configured != 0 {
        asm!("tilerelease", options(nostack, nomem));
    }
}

/// One block's integer dot products of up to 16 activation rows with a group's 16 weight rows (row
/// `r` at `[16r..16r + 16]`), as `tilestored` leaves them. One per call, reused by all its tiles.
#[repr(C, align(64))]
struct Dots([i32; 16 * R16]);

/// `GROUPS` (1 or 2) consecutive groups' 16 weight rows each (the first at `group`, the next
/// `group_bytes` on) against activation rows `first..first + rows` (`rows <= ROWS`, the configured
/// tile rows). `ROWS` is the size of the f32 epilogue (8 or 16 registers); rows past `rows` are
/// computed from stale values in `dots` and not stored. Group `k`'s results go to `y + 16k`.
#[inline]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn tile<const ROWS: usize, const GROUPS: usize>(
    group: *const u8,
    group_bytes: usize,
    acts: &QuantizedActs,
    first: usize,
    rows: usize,
    y: *mut f32,
    y_stride: usize,
    dots: &mut [Dots; 2],
) {
    let nb = acts.cols / QK8_0;
    let xq = acts.q.as_ptr().add(first * acts.cols);
    // Scales of the tile's rows; rows past `rows` read the last one (their results are dropped).
    let xd: [*const f32; ROWS] = std::array::from_fn(|r| acts.d.as_ptr().add((first + r.min(rows - 1)) * acts.stride));
    let mut acc = [[_mm512_setzero_ps(); ROWS]; GROUPS];
    let [d0, d1] = dots;
    for b in 0..nb {
        let blk = group.add(b * Q8_0R16_GROUP_BYTES);
        let blocks: [*const u8; GROUPS] = std::array::from_fn(|k| blk.add(k * group_bytes));
        for &blk in &blocks {
            super::prefetch_l2(blk.wrapping_add(super::R16_PREFETCH_AHEAD), Q8_0R16_GROUP_BYTES);
        }
        if GROUPS == 2 {
            asm!(
                "tilezero tmm0",
                "tilezero tmm3",
                "tileloadd tmm1, [{x} + {xs} * 1]",
                "tileloadd tmm2, [{w0} + {ws} * 1]",
                "tileloadd tmm4, [{w1} + {ws} * 1]",
                "tdpbssd tmm0, tmm1, tmm2",
                "tdpbssd tmm3, tmm1, tmm4",
                "tilestored [{d0} + {ws} * 1], tmm0",
                "tilestored [{d1} + {ws} * 1], tmm3",
                x = in(reg) xq.add(b * QK8_0),
                xs = in(reg) acts.cols,
                w0 = in(reg) blocks[0].add(2 * R16),
                w1 = in(reg) blocks[GROUPS - 1].add(2 * R16),
                ws = in(reg) 64usize,
                d0 = in(reg) d0.0.as_mut_ptr(),
                d1 = in(reg) d1.0.as_mut_ptr(),
                options(nostack),
            );
        } else {
            asm!(
                "tilezero tmm0",
                "tileloadd tmm1, [{x} + {xs} * 1]",
                "tileloadd tmm2, [{w} + {ws} * 1]",
                "tdpbssd tmm0, tmm1, tmm2",
                "tilestored [{d} + {ws} * 1], tmm0",
                x = in(reg) xq.add(b * QK8_0),
                xs = in(reg) acts.cols,
                w = in(reg) blk.add(2 * R16),
                ws = in(reg) 64usize,
                d = in(reg) d0.0.as_mut_ptr(),
                options(nostack),
            );
        }
        for k in 0..GROUPS {
            let dots = if k == 0 { &*d0 } else { &*d1 };
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(blocks[k] as *const __m256i));
            for r in 0..ROWS {
                let dot = _mm512_cvtepi32_ps(_mm512_load_si512(dots.0.as_ptr().add(r * R16) as *const __m512i));
                let scale = _mm512_mul_ps(dw, _mm512_set1_ps(*xd[r].add(b)));
                acc[k][r] = _mm512_fmadd_ps(dot, scale, acc[k][r]);
            }
        }
    }
    for k in 0..GROUPS {
        for r in 0..rows.min(ROWS) {
            _mm512_storeu_ps(y.add(r * y_stride + k * R16), acc[k][r]);
        }
    }
}
