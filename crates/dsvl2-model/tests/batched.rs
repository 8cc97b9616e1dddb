//! Batched decoding must not change results: every sequence of a `step_batch` gets the greedy
//! tokens and (up to float summation order) the logits it gets when decoded alone with `step`,
//! whatever else is in the batch, at whatever cache length, and when sequences join or leave.
//! Run with `--nocapture` to see the measured differences and step timings.

use std::time::Instant;

use dsvl2_model::{DType, DeepseekVl2, Device, ModelError, SequenceCache, SharedPrefix, Tensor};

mod common;
use common::*;

/// Greedy steps compared per sequence.
const STEPS: usize = 8;

/// Largest |batched - alone| logit difference allowed. Batched matmuls (M = B rows instead of 1)
/// may sum in a different order; measured on the fixture models (f32, CPU, 2 threads), the worst
/// difference over all steps and batch compositions is 7.6e-6 (tiny-like, small-like) and 8.6e-6
/// (base-like). 5e-5 is ~6x that, and 4x below the fixtures' own parity tolerance (2e-4); a wrong
/// position, cache row or expert choice moves logits by far more. A sequence only ever decoded
/// in batches of one runs the single-sequence code path, so there the difference must be exactly
/// 0 (after a batch of several, its cache rows carry that batch's rounding, so it need not be).
const TOL_LOGITS: f32 = 5e-5;

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, |m, d| if d.is_nan() { f32::NAN } else { m.max(d) })
}

/// Prompt embeddings `[len, hidden]` of a fixture case, images included.
fn case_embeds(model: &DeepseekVl2, case: &str) -> Tensor {
    let inputs = CaseInputs::load(&fixtures().join("cases").join(case));
    model
        .embed_inputs(&inputs.ids, &inputs.mask, inputs.images(), None)
        .expect("embed_inputs")
}

/// Text-only prompt embeddings from made-up ids.
fn text_embeds(model: &DeepseekVl2, len: usize, seed: u32) -> Tensor {
    let vocab = model.config().language.vocab_size as u32;
    let ids: Vec<u32> = (0..len as u32).map(|i| (seed + i * 131 + i * i * 7) % vocab).collect();
    model.language().embed(&ids).unwrap()
}

/// The three prompts of each variant: two text-only of different lengths and one with an image.
fn prompts(model: &DeepseekVl2) -> Vec<(&'static str, Tensor)> {
    vec![
        ("text5", text_embeds(model, 5, 11)),
        ("text37", text_embeds(model, 37, 2024)),
        ("single_small", case_embeds(model, "single_small")),
    ]
}

/// One sequence decoded alone: its prefill logits, then the logits of each greedy `step`.
struct Solo {
    /// `logits[0]` from the prefill; `logits[i]` after feeding `tokens[i - 1]`.
    logits: Vec<Tensor>,
    /// Greedy choice of each `logits[i]`.
    tokens: Vec<u32>,
}

fn decode_alone(model: &DeepseekVl2, embeds: &Tensor) -> Solo {
    let mut cache = model.new_cache();
    let mut logits = vec![model.forward_embeds(embeds, &mut cache, None).unwrap()];
    let mut tokens = vec![argmax(&logits[0])];
    for _ in 0..STEPS {
        let l = model.step(*tokens.last().unwrap(), &mut cache).unwrap();
        tokens.push(argmax(&l));
        logits.push(l);
    }
    Solo { logits, tokens }
}

/// A sequence in a batched run: its cache, and the next step (1-based index into `Solo::logits`).
struct Running<'a> {
    name: &'static str,
    solo: &'a Solo,
    cache: SequenceCache,
    tokens: Vec<u32>,
}

impl<'a> Running<'a> {
    fn prefill(model: &DeepseekVl2, name: &'static str, embeds: &Tensor, solo: &'a Solo) -> Self {
        let mut cache = model.new_cache();
        let logits = model.forward_embeds(embeds, &mut cache, None).unwrap();
        assert_eq!(
            max_abs_diff(&logits, &solo.logits[0]),
            0.0,
            "{name}: prefill is deterministic"
        );
        Running {
            name,
            solo,
            cache,
            tokens: vec![argmax(&logits)],
        }
    }

    /// A sequence that continues after a shared copy of its prompt's cache (prefilled alone).
    fn branch(name: &'static str, prefix: &SharedPrefix, solo: &'a Solo) -> Self {
        Running {
            name,
            solo,
            cache: prefix.branch(),
            tokens: vec![solo.tokens[0]],
        }
    }

    fn done(&self) -> bool {
        self.tokens.len() > STEPS
    }
}

/// One `step_batch` over the sequences `active` (indices into `seqs`), checking each row against
/// the sequence decoded alone; returns the largest logit difference.
fn batched_step(model: &DeepseekVl2, label: &str, seqs: &mut [Running], active: &[usize]) -> f32 {
    let tokens: Vec<u32> = active.iter().map(|&i| *seqs[i].tokens.last().unwrap()).collect();
    let lens: Vec<usize> = active.iter().map(|&i| seqs[i].cache.len()).collect();
    let logits = {
        let mut caches: Vec<&mut SequenceCache> = seqs
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| active.contains(i))
            .map(|(_, s)| &mut s.cache)
            .collect();
        // `caches` is in `seqs` order; keep `active` sorted so rows line up.
        assert!(active.windows(2).all(|w| w[0] < w[1]));
        model.step_batch(&tokens, &mut caches).expect("step_batch")
    };
    assert_eq!(logits.dims(), [active.len(), model.config().language.vocab_size]);
    let mut worst = 0.0f32;
    for (row, &i) in active.iter().enumerate() {
        let seq = &mut seqs[i];
        assert_eq!(
            seq.cache.len(),
            lens[row] + 1,
            "{label}/{}: cache grew by one",
            seq.name
        );
        let step = seq.tokens.len();
        let ours = logits.get(row).unwrap();
        let d = max_abs_diff(&ours, &seq.solo.logits[step]);
        assert!(
            d <= TOL_LOGITS,
            "{label}/{}: step {step} (batch of {}, position {}): logits differ from decoding alone by {d:.3e} > {TOL_LOGITS:.0e}",
            seq.name,
            active.len(),
            lens[row]
        );
        worst = worst.max(d);
        seq.tokens.push(argmax(&ours));
        assert_eq!(
            seq.tokens[..],
            seq.solo.tokens[..=step],
            "{label}/{}: greedy tokens differ from decoding alone",
            seq.name
        );
    }
    worst
}

fn run_variant(variant: &str) {
    run_model(variant, &load_model(&fixtures(), variant));
}

fn run_model(variant: &str, model: &DeepseekVl2) {
    let prompts = prompts(model);
    let solos: Vec<Solo> = prompts.iter().map(|(_, e)| decode_alone(model, e)).collect();

    // All three together for every step: each at its own (different) cache length.
    let mut seqs: Vec<Running> = prompts
        .iter()
        .zip(&solos)
        .map(|((name, e), solo)| Running::prefill(model, name, e, solo))
        .collect();
    let mut worst_full = 0.0f32;
    for _ in 0..STEPS {
        worst_full = worst_full.max(batched_step(model, variant, &mut seqs, &[0, 1, 2]));
    }
    assert!(seqs.iter().all(Running::done));

    // Batches of one are exactly `step`.
    let mut alone = Running::prefill(model, prompts[1].0, &prompts[1].1, &solos[1]);
    for _ in 0..STEPS {
        let logits = model
            .step_batch(&[*alone.tokens.last().unwrap()], &mut [&mut alone.cache])
            .unwrap();
        let step = alone.tokens.len();
        let d = max_abs_diff(&logits.get(0).unwrap(), &solos[1].logits[step]);
        assert_eq!(d, 0.0, "{variant}: step {step}: a batch of one differs from `step`");
        alone.tokens.push(argmax(&logits.get(0).unwrap()));
    }
    assert_eq!(alone.tokens, solos[1].tokens);

    // Changing composition: text37 and the image prompt start together, text5 joins after two
    // steps (prefilled then), the image prompt leaves after five, and a second copy of text5
    // joins two steps behind the first, so the same prompt runs at two cache lengths in one
    // batch. Each runs its 8 steps (the batch sizes per step are printed).
    let mut seqs: Vec<Running> = Vec::new();
    let mut slot_of = Vec::new();
    let mut worst_mixed = 0.0f32;
    let mut sizes = Vec::new();
    for step in 0.. {
        let joins: &[usize] = match step {
            0 => &[1, 2],
            2 => &[0],
            3 => &[0],
            _ => &[],
        };
        for &p in joins {
            let (name, e) = &prompts[p];
            seqs.push(Running::prefill(model, name, e, &solos[p]));
            slot_of.push(p);
        }
        let active: Vec<usize> = (0..seqs.len())
            .filter(|&i| {
                let left_early = slot_of[i] == 2 && seqs[i].tokens.len() > 5;
                !seqs[i].done() && !left_early
            })
            .collect();
        if active.is_empty() {
            break;
        }
        sizes.push(active.len());
        worst_mixed = worst_mixed.max(batched_step(model, variant, &mut seqs, &active));
    }
    // The image prompt left early; everything else ran to the end.
    for (i, s) in seqs.iter().enumerate() {
        assert!(s.done() || slot_of[i] == 2, "{}: did not finish", s.name);
    }
    let worst_shared = shared_prefixes(variant, model, &prompts, &solos);
    println!(
        "{variant:>10}: max |batched - alone| logits: all 3 together {worst_full:.3e}, \
         join/leave (batch sizes {sizes:?}) {worst_mixed:.3e}, branches of shared prefixes \
         {worst_shared:.3e} (tolerance {TOL_LOGITS:.0e})"
    );
}

/// Sequences that continue from shared prompt caches (`SequenceCache::share`, `branch`) decode as
/// the prompt alone does: two branches of each prompt in one batch of six; a branch cut back into
/// its prefix and prefilled again (the attention over a prefix's pieces and its own rows); and a
/// branch of that branch, so a prefix holds a prefix of its own. Returns the largest difference.
fn shared_prefixes(variant: &str, model: &DeepseekVl2, prompts: &[(&'static str, Tensor)], solos: &[Solo]) -> f32 {
    let prefixes: Vec<SharedPrefix> = prompts
        .iter()
        .map(|(_, e)| {
            let mut cache = model.new_cache();
            model.forward_embeds(e, &mut cache, None).unwrap();
            cache.share()
        })
        .collect();
    let mut seqs: Vec<Running> = prompts
        .iter()
        .zip(solos)
        .zip(&prefixes)
        .flat_map(|(((name, _), solo), prefix)| [0, 1].map(|_| Running::branch(name, prefix, solo)))
        .collect();
    let all: Vec<usize> = (0..seqs.len()).collect();
    let mut worst = 0.0f32;
    for _ in 0..STEPS {
        worst = worst.max(batched_step(model, &format!("{variant} branches"), &mut seqs, &all));
    }
    // The frozen prompts are untouched by their branches.
    for (prefix, (_, e)) in prefixes.iter().zip(prompts) {
        assert_eq!(prefix.len(), e.dim(0).unwrap());
    }

    // A frozen cache holds exactly its positions: no room to grow (a 5-token prompt and 3 steps
    // sit in a buffer of 16 positions until then).
    let per_position = {
        let mut cache = model.new_cache();
        model
            .forward_embeds(&text_embeds(model, 32, 5), &mut cache, None)
            .unwrap();
        cache.share().bytes() / 32
    };
    let mut eight = model.new_cache();
    model
        .forward_embeds(&text_embeds(model, 5, 7), &mut eight, None)
        .unwrap();
    for token in [1, 2, 3] {
        model.step(token, &mut eight).unwrap();
    }
    assert_eq!(
        eight.share().bytes(),
        8 * per_position,
        "{variant}: a frozen cache is compact"
    );

    // Cut back five positions into the 37-token prompt's prefix and prefilled again from there.
    let (embeds, solo) = (&prompts[1].1, &solos[1]);
    let len = embeds.dim(0).unwrap();
    let mut cache = prefixes[1].branch();
    cache.truncate(len - 5);
    assert_eq!(cache.len(), len - 5);
    let tail = embeds.narrow(0, len - 5, 5).unwrap();
    let logits = model.forward_embeds(&tail, &mut cache, None).unwrap();
    let d = max_abs_diff(&logits, &solo.logits[0]);
    assert!(
        d <= TOL_LOGITS,
        "{variant}: prompt prefilled after a cut prefix: {d:.3e}"
    );
    worst = worst.max(d);
    // Two steps on it, then a branch of it (prefix of a prefix) for the rest.
    let mut tokens = vec![solo.tokens[0]];
    for step in 1..=STEPS {
        if step == 3 {
            cache = cache.share().branch();
        }
        let logits = model.step(*tokens.last().unwrap(), &mut cache).unwrap();
        let d = max_abs_diff(&logits, &solo.logits[step]);
        assert!(d <= TOL_LOGITS, "{variant}: step {step} after a cut prefix: {d:.3e}");
        worst = worst.max(d);
        tokens.push(argmax(&logits));
    }
    assert_eq!(tokens, solo.tokens, "{variant}: greedy tokens after a cut prefix");
    worst
}

#[test]
fn tiny_like_batched_matches_alone() {
    run_variant("tiny-like");
}

/// An i8 cache rounds each appended row on its own, so batching does not change what it holds
/// beyond the rows' own float differences (which can move a value across a rounding boundary).
#[test]
fn tiny_like_with_i8_cache_batched_matches_alone() {
    let mut model = load_model(&fixtures(), "tiny-like");
    model.set_cache_format(dsvl2_model::CacheFormat::I8);
    run_model("tiny-like (i8 cache)", &model);
}

#[test]
fn small_like_batched_matches_alone() {
    run_variant("small-like");
}

#[test]
fn base_like_batched_matches_alone() {
    run_variant("base-like");
}

/// Caches of different formats in one batch (the format is chosen when a cache is made) are each
/// attended over as they would be alone.
#[test]
fn caches_of_different_formats_batch_together() {
    use dsvl2_model::CacheFormat;
    let mut model = load_model(&fixtures(), "tiny-like");
    let prompts = [
        text_embeds(&model, 5, 11),
        text_embeds(&model, 37, 2024),
        text_embeds(&model, 9, 7),
    ];
    let formats = [CacheFormat::F32, CacheFormat::I8, CacheFormat::F16];
    let mut caches: Vec<SequenceCache> = Vec::new();
    let mut alone: Vec<SequenceCache> = Vec::new();
    for (prompt, format) in prompts.iter().zip(formats) {
        model.set_cache_format(format);
        for copies in [&mut caches, &mut alone] {
            let mut cache = model.new_cache();
            model.forward_embeds(prompt, &mut cache, None).unwrap();
            copies.push(cache);
        }
    }
    let tokens = [3u32, 1000, 42];
    let mut refs: Vec<&mut SequenceCache> = caches.iter_mut().collect();
    let batched = model.step_batch(&tokens, &mut refs).unwrap();
    for (i, cache) in alone.iter_mut().enumerate() {
        let logits = model.step(tokens[i], cache).unwrap();
        let d = max_abs_diff(&batched.get(i).unwrap(), &logits);
        assert!(d <= TOL_LOGITS, "sequence {i} ({}): {d}", formats[i]);
    }
}

#[test]
fn bad_batches_are_errors_and_leave_caches_alone() {
    let model = load_model(&fixtures(), "small-like");
    let mut a = model.new_cache();
    model.forward_embeds(&text_embeds(&model, 4, 1), &mut a, None).unwrap();

    let err = model.step_batch(&[], &mut []).unwrap_err();
    assert!(matches!(err, ModelError::Input(_)), "{err}");
    assert!(err.to_string().contains("empty"), "{err}");

    let err = model.step_batch(&[1, 2], &mut [&mut a]).unwrap_err();
    assert!(err.to_string().contains("2 token(s) for 1"), "{err}");

    let vocab = model.config().language.vocab_size as u32;
    let err = model.step_batch(&[vocab], &mut [&mut a]).unwrap_err();
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");

    let hidden = model.config().language.hidden_size;
    let wrong = Tensor::zeros((2, hidden), DType::F32, &Device::Cpu).unwrap();
    let err = model.language().decode_batch(&wrong, &mut [&mut a]).unwrap_err();
    assert!(err.to_string().contains("needs embeddings [1,"), "{err}");
    assert_eq!(a.len(), 4, "failed calls leave the cache as it was");
}

#[test]
fn batch_past_the_context_is_an_error() {
    let model = load_model(&fixtures(), "tiny-like");
    let context = model.config().language.max_position_embeddings;
    let mut short = model.new_cache();
    model
        .forward_embeds(&text_embeds(&model, 3, 5), &mut short, None)
        .unwrap();
    let mut full = model.new_cache();
    model
        .forward_embeds(&text_embeds(&model, context - 1, 9), &mut full, None)
        .unwrap();
    // The last free position still works, batched with a short sequence.
    model.step_batch(&[1, 2], &mut [&mut short, &mut full]).unwrap();
    assert_eq!(full.len(), context);
    let err = model.step_batch(&[1, 2], &mut [&mut short, &mut full]).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("sequence 1 of the batch") && text.contains(&format!("context of {context} tokens")),
        "{text}"
    );
    assert_eq!((short.len(), full.len()), (4, context), "nothing ran");
}

/// Not a benchmark: prints the time of one decode step for B=1 (`step`), B=1 and B=4
/// (`step_batch`) on the fixture models, to see that batching amortises the per-step cost.
#[test]
fn step_time_b1_vs_b4() {
    for variant in ["tiny-like", "base-like"] {
        let model = load_model(&fixtures(), variant);
        let mut caches: Vec<SequenceCache> = (0..4)
            .map(|i| {
                let mut c = model.new_cache();
                model
                    .forward_embeds(&text_embeds(&model, 64 + 16 * i, i as u32), &mut c, None)
                    .unwrap();
                c
            })
            .collect();
        let reps = 20;
        let time = |f: &mut dyn FnMut()| {
            f();
            let t = Instant::now();
            for _ in 0..reps {
                f();
            }
            t.elapsed().as_secs_f64() / reps as f64 * 1e3
        };
        let (first, rest) = caches.split_first_mut().unwrap();
        let single = time(&mut || {
            model.step(7, first).unwrap();
        });
        let b1 = time(&mut || {
            model.step_batch(&[7], &mut [&mut *first]).unwrap();
        });
        let b4 = time(&mut || {
            let mut batch: Vec<&mut SequenceCache> = std::iter::once(&mut *first).chain(rest.iter_mut()).collect();
            model.step_batch(&[7, 8, 9, 10], &mut batch).unwrap();
        });
        println!(
            "{variant:>10}: step {single:.3} ms; step_batch B=1 {b1:.3} ms, B=4 {b4:.3} ms \
             ({:.3} ms per sequence)",
            b4 / 4.0
        );
    }
}
