//! Quality of the compact weight formats: under teacher forcing (each step is fed the reference's
//! greedy token), how often the top-1 token of a model stored in f16, bf16, q8_0 or q4_k equals
//! the reference's (which is what the f32 model gives, see `parity.rs`).
//!
//! The fixture models are small: their widths (48..160) are multiples of 32 but not of 256, so
//! q4_k falls back to q8_0 for most layers here (the storage rule; only a projector input of 256
//! takes q4_k), and the 48-wide vision towers to q8_0 in the interleaved layout, whose rows may end
//! in a zero-padded block (f16 before 2026-12-02 evening; the 179-row fc1 stays f16).
//!
//! The language model's q8_0 weights take the 16-row interleaved layout (every fixture width is a
//! multiple of 16), so its kernels are the ones measured here.
//!
//! Measured (2026-12-01, with the integer-dot kernels that quantize activations to 8 bits): f16
//! 100%, bf16 99.7%, q8_0 96.0%, q4_k request 94.1% of 648 steps; 2026-12-02 with the interleaved
//! layout, whose f32 sums run in another order, q8_0 95.8% and q4_k 94.0% (with f32 activations against
//! the same weights, q8_0 gave 96.5%: most of the loss is the weights' rounding); with the interleaved
//! kernels for prompts too (8-bit activations there as well), q8_0 96.0% and q4_k 94.1%, and with the
//! projector's weights interleaved as well, q8_0 95.8%; with the vision towers' linears (48 wide) in
//! q8_0 too instead of f16, q8_0 95.4% (618 of 648 steps, was 620), q4_k 93.5% (606, was 609), and
//! q8_0 with an i8 cache 97.7% (211 of 216, was 210); 2026-12-03, with products of 128 or more rows
//! on AMX-BF16 (weights and activations rounded to bf16 instead of 8-bit activations), q8_0 95.2%
//! (617), q4_k 93.2% (604), q8_0 with an i8 cache 97.2% (210); from 64 rows on, 620, 607 and 210. The
//! q8_0 figure is below the 99% we aimed for, and it is the format, not the kernels: the
//! reference's own logits on these random-weight models have a top-1/top-2 gap under 0.08-0.19
//! (logit std ~4) at 10% of the steps, and q8_0's per-weight rounding (~0.5% of a weight's scale)
//! moves logits by about that much after a few layers. No single layer kind is to blame (keeping
//! any one of lm_head, attention, experts, vision or projector in f16 changes agreement by at most
//! 1.4 points). The thresholds below are those measurements less a margin (summation order differs
//! between the AVX2 and AVX-512 kernels, which can flip a near-tie), so a kernel or storage
//! regression (which moves logits far more than rounding) fails.

mod common;

use std::path::Path;

use common::{argmax, fixtures, load_model_with, read_json, CaseInputs};
use dsvl2_model::{CacheFormat, Format};

/// (top-1 agreements, steps) over every fixture case of `variant` under `root`.
fn teacher_forced_agreement(
    root: &Path,
    variant: &str,
    format: Format,
    kv_cache: Option<CacheFormat>,
) -> (usize, usize) {
    let model = load_model_with(root, variant, format, kv_cache);
    let index = read_json(&root.join("cases/index.json"));
    let (mut agree, mut steps) = (0, 0);
    for (case, info) in index["model_cases"].as_object().expect("model_cases") {
        if !info["variants"].as_object().unwrap().contains_key(variant) {
            continue;
        }
        let case_dir = root.join("cases").join(case);
        let expected = read_json(&case_dir.join(format!("{variant}.json")));
        let generated: Vec<u32> = serde_json::from_value(expected["generated_ids"].clone()).unwrap();
        let inputs = CaseInputs::load(&case_dir);
        let embeds = model
            .embed_inputs(&inputs.ids, &inputs.mask, inputs.images(), None)
            .unwrap();
        let mut cache = model.new_cache();
        let mut logits = model.forward_embeds(&embeds, &mut cache, None).unwrap();
        for (i, &reference) in generated.iter().enumerate() {
            if i > 0 {
                logits = model.step(generated[i - 1], &mut cache).unwrap();
            }
            agree += usize::from(argmax(&logits) == reference);
            steps += 1;
        }
    }
    (agree, steps)
}

fn check_format(format: Format, min_agreement: f64) {
    check_formats(format, None, min_agreement)
}

/// [`check_format`] with MHA caches in `kv_cache` (`None`: the default for `format`). Only the MHA
/// variants (tiny-like, heldout-mha-gqa) have such a cache, so with `kv_cache` only they are measured.
fn check_formats(format: Format, kv_cache: Option<CacheFormat>, min_agreement: f64) {
    let label = match kv_cache {
        Some(kv) => format!("{format} (kv {kv})"),
        None => format.to_string(),
    };
    let mut lines = Vec::new();
    let (mut agree, mut steps) = (0, 0);
    let public = fixtures();
    let heldout = public.join("heldout");
    // (folder, variant, uses MHA)
    let models = [
        (&public, "tiny-like", true),
        (&public, "small-like", false),
        (&public, "base-like", false),
        (&heldout, "heldout-mha-gqa", true),
        (&heldout, "heldout-mla-qlora-yarn", false),
        (&heldout, "heldout-mla-noaux-groups", false),
    ];
    for (root, variant, _) in models.into_iter().filter(|&(_, _, mha)| mha || kv_cache.is_none()) {
        let (a, s) = teacher_forced_agreement(root, variant, format, kv_cache);
        lines.push(format!("{label} {variant:<26} {a}/{s}"));
        agree += a;
        steps += s;
    }
    let ratio = agree as f64 / steps as f64;
    println!(
        "{}\n{label}: top-1 agreement {agree}/{steps} = {:.2}%",
        lines.join("\n"),
        100.0 * ratio
    );
    assert!(steps >= 100, "too few steps ({steps}) to measure agreement");
    assert!(
        ratio >= min_agreement,
        "{label}: top-1 agreement {ratio:.4} is below {min_agreement}"
    );
}

#[test]
fn q8_0_agrees_with_the_reference() {
    check_format(Format::Q8_0, 0.94);
}

#[test]
fn q4_k_request_agrees_with_the_reference() {
    check_format(Format::Q4K, 0.92);
}

#[test]
fn f16_and_bf16_agree_with_the_reference() {
    check_format(Format::F16, 0.99);
    check_format(Format::Bf16, 0.99);
}

#[test]
fn compact_caches_agree_with_the_reference() {
    // Measured (2026-12-02, 216 steps of the MHA variants): f32 weights with an f16 cache 100%, with
    // an i8 cache 99.1%; q8_0 weights with f16 99.1%, with i8 98.6% (97.7% once prompts and the
    // projector also ran on the 8-bit kernels). The i8 cache's rounding costs about what q8_0's
    // weights do. Thresholds: those less 2-4 steps of margin.
    check_formats(Format::F32, Some(CacheFormat::F16), 0.99);
    check_formats(Format::F32, Some(CacheFormat::I8), 0.97);
    check_formats(Format::Q8_0, Some(CacheFormat::I8), 0.96);
}
