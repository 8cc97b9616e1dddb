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

/// Tiles for `rows` activation rows: 0 holds the dot products (`rows` x 16 i32), 1 the activations'
/// block (`rows` x 32 bytes), 2 the group's block of weights (8 x 64 bytes).
///
/// # Safety
/// AMX must be [`available`].
unsafe fn load_config(rows: usize) {
    configure_tiles(&[(rows as u8, 64), (rows as u8, 32), (8, 64)]);
}

/// `y[i · y_stride + k]` for the `m` activation rows and the `nrows` weight rows of `w` (q8_0_r16
/// groups), 16 activation rows at a time (the tiles are configured again whenever the count changes:
/// at most twice per group, for the last, partial tile and back).
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
    let mut configured = 0;
    let mut dots = Dots([0; 16 * R16]);
    super::for_each_r16_tile(w, nrows, acts, m, y, y_stride, |group, first, out| {
        let rows = (m - first).min(16);
        if rows != configured {
            load_config(rows);
            configured = rows;
        }
        if rows > 8 {
            tile::<16>(group, acts, first, rows, out, y_stride, &mut dots);
        } else {
            tile::<8>(group, acts, first, rows, out, y_stride, &mut dots);
        }
        rows
    });
    if configured != 0 {
        asm!("tilerelease", options(nostack, nomem));
    }
}

/// One block's integer dot products of up to 16 activation rows with a group's 16 weight rows (row
/// `r` at `[16r..16r + 16]`), as `tilestored` leaves them. One per call, reused by all its tiles.
#[repr(C, align(64))]
struct Dots([i32; 16 * R16]);

/// One group's 16 weight rows against activation rows `first..first + rows` (`rows <= ROWS`, the
/// configured tile rows). `ROWS` is the size of the f32 epilogue (8 or 16 registers); rows past
/// `rows` are computed from stale values in `dots` and not stored.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn tile<const ROWS: usize>(
    group: *const u8,
    acts: &QuantizedActs,
    first: usize,
    rows: usize,
    y: *mut f32,
    y_stride: usize,
    dots: &mut Dots,
) {
    let nb = acts.cols / QK8_0;
    let xq = acts.q.as_ptr().add(first * acts.cols);
    // Scales of the tile's rows; rows past `rows` read the last one (their results are dropped).
    let xd: [*const f32; ROWS] = std::array::from_fn(|r| acts.d.as_ptr().add((first + r.min(rows - 1)) * acts.stride));
    let mut acc = [_mm512_setzero_ps(); ROWS];
    for b in 0..nb {
        let blk = group.add(b * Q8_0R16_GROUP_BYTES);
        super::prefetch_l2(blk.wrapping_add(super::R16_PREFETCH_AHEAD), Q8_0R16_GROUP_BYTES);
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
            d = in(reg) dots.0.as_mut_ptr(),
            options(nostack),
        );
        let dw = _mm512_cvtph_ps(_mm256_loadu_si256(blk as *const __m256i));
        for r in 0..ROWS {
            let dot = _mm512_cvtepi32_ps(_mm512_load_si512(dots.0.as_ptr().add(r * R16) as *const __m512i));
            let scale = _mm512_mul_ps(dw, _mm512_set1_ps(*xd[r].add(b)));
            acc[r] = _mm512_fmadd_ps(dot, scale, acc[r]);
        }
    }
    for r in 0..rows.min(ROWS) {
        _mm512_storeu_ps(y.add(r * y_stride), acc[r]);
    }
}
