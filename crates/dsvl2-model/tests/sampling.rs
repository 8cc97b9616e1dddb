//! The logits processors against transformers 4.38's, stage by stage, on every case of
//! tests/fixtures/sampling.json (12 parameter sets x 7 logits vectors).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use dsvl2_model::sampling::{apply_repetition_penalty, apply_temperature, apply_top_k, apply_top_p, argmax, softmax};
use dsvl2_model::{Device, Tensor};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn vector(tensors: &HashMap<String, Tensor>, name: &str) -> Vec<f32> {
    tensors
        .get(name)
        .unwrap_or_else(|| panic!("no tensor {name}"))
        .to_vec1()
        .unwrap()
}

/// Exact equality, -inf included; names the first differing index.
fn assert_same(label: &str, ours: &[f32], reference: &[f32]) {
    assert_eq!(ours.len(), reference.len(), "{label}: length");
    for (i, (a, b)) in ours.iter().zip(reference).enumerate() {
        assert!(
            a == b || (a.is_nan() && b.is_nan()),
            "{label}: index {i}: ours {a}, reference {b}"
        );
    }
}

/// For the cases where equal scores straddle the top-p boundary (torch's CPU sort is not stable,
/// so which tied entries survive is torch-specific): the same number of survivors, and every
/// survivor of ours that the reference dropped ties with one the reference kept.
fn assert_same_up_to_ties(label: &str, ours: &[f32], reference: &[f32]) {
    let kept = |v: &[f32]| v.iter().filter(|s| s.is_finite()).count();
    assert_eq!(kept(ours), kept(reference), "{label}: number of kept scores");
    for (i, (a, b)) in ours.iter().zip(reference).enumerate() {
        if a.is_finite() && b.is_finite() {
            assert_eq!(a, b, "{label}: index {i}");
        } else if a.is_finite() {
            assert!(
                reference.iter().any(|r| r == a),
                "{label}: index {i}: ours keeps {a}, which the reference has nowhere"
            );
        }
    }
}

#[test]
fn every_stage_of_every_case_matches_transformers() {
    let spec: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("sampling.json")).unwrap()).unwrap();
    let tensors = candle_core::safetensors::load(fixtures().join("sampling.safetensors"), &Device::Cpu).unwrap();
    let cases = spec["cases"].as_array().unwrap();
    let mut loose = 0;
    for case in cases {
        let key = case["key"].as_str().unwrap();
        let label = format!(
            "case {key} ({}, {})",
            case["params"].as_str().unwrap(),
            case["logits_case"].as_str().unwrap()
        );
        let effective = &case["effective"];
        let seen: Vec<u32> = serde_json::from_value(case["input_ids"].clone()).unwrap();
        let tie_sensitive = case["top_p_tie_sensitive"].as_bool().unwrap_or(false);
        let mut scores = vector(&tensors, &format!("{key}.logits"));
        for stage in case["stages"].as_array().unwrap() {
            let stage = stage.as_str().unwrap();
            match stage {
                "RepetitionPenaltyLogitsProcessor" => apply_repetition_penalty(
                    &mut scores,
                    &seen,
                    effective["repetition_penalty"].as_f64().unwrap() as f32,
                ),
                "TemperatureLogitsWarper" => {
                    apply_temperature(&mut scores, effective["temperature"].as_f64().unwrap() as f32)
                }
                "TopKLogitsWarper" => apply_top_k(&mut scores, effective["top_k"].as_u64().unwrap() as usize),
                "TopPLogitsWarper" => apply_top_p(&mut scores, effective["top_p"].as_f64().unwrap()),
                other => panic!("{label}: unknown stage {other}"),
            }
            let reference = vector(&tensors, &format!("{key}.after_{stage}"));
            if tie_sensitive && stage == "TopPLogitsWarper" {
                assert_same_up_to_ties(&format!("{label} after {stage}"), &scores, &reference);
                scores = reference; // continue from the reference's choice among the ties
                loose += 1;
            } else {
                assert_same(&format!("{label} after {stage}"), &scores, &reference);
            }
        }
        assert_same(
            &format!("{label} final scores"),
            &scores,
            &vector(&tensors, &format!("{key}.final_scores")),
        );
        if effective["do_sample"].as_bool().unwrap() {
            let probs = softmax(&scores);
            let reference = vector(&tensors, &format!("{key}.probs"));
            let worst = probs
                .iter()
                .zip(&reference)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            // Softmax sums in a different order than torch's vectorised kernel: a few ulp.
            assert!(worst <= 1e-6, "{label}: probabilities differ by {worst}");
            let kept = scores.iter().filter(|s| s.is_finite()).count();
            assert_eq!(kept as u64, case["n_kept"].as_u64().unwrap(), "{label}: kept tokens");
        } else {
            assert_eq!(
                argmax(&scores) as u64,
                case["greedy_token"].as_u64().unwrap(),
                "{label}: greedy token"
            );
        }
    }
    assert_eq!(cases.len(), 84);
    assert_eq!(loose, 4, "the four tie-sensitive cases were compared loosely");
}
