//! The scheduler loop: admit, prefill one chunk, one batched decode step, repeat.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, TryRecvError};

use dsvl2_model::DeepseekVl2;
use dsvl2_processor::Processor;
use rayon::prelude::*;

use crate::prompt_cache::PromptCache;
use crate::sequence::Sequence;
use crate::{EngineConfig, EngineStats, Job};

pub(crate) fn run(
    model: &DeepseekVl2,
    processor: &Processor,
    config: &EngineConfig,
    queue: Receiver<Job>,
    stats: &EngineStats,
) {
    let mut running: Vec<Sequence> = Vec::new();
    let mut prompts = PromptCache::new(config.prompt_cache_bytes);
    let mut open = true;
    loop {
        // Admit: block only when there is nothing else to do.
        while open && running.len() < config.max_running.max(1) {
            let job = if running.is_empty() {
                match queue.recv() {
                    Ok(job) => job,
                    Err(_) => {
                        open = false;
                        break;
                    }
                }
            } else {
                match queue.try_recv() {
                    Ok(job) => job,
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            };
            stats.queued.fetch_sub(1, Ordering::SeqCst);
            running.push(Sequence::new(job, model, processor));
        }
        if running.is_empty() {
            if open {
                continue;
            }
            stats.running.store(0, Ordering::SeqCst);
            return;
        }
        stats.running.store(running.len(), Ordering::SeqCst);

        // A panic in model code fails the requests of this iteration, not the server.
        let iteration = catch_unwind(AssertUnwindSafe(|| {
            step(model, config, &mut running, &mut prompts, stats)
        }));
        if let Err(panic) = iteration {
            let message = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("unknown panic");
            for seq in running.iter_mut().filter(|s| !s.is_finished()) {
                seq.fail(&format!("internal error: {message}"));
            }
        }
        // A finished conversation is kept: a chat's next turn resends it and starts after it.
        for seq in running.iter_mut().filter(|s| s.is_finished()) {
            if let Some((tokens, prefix)) = seq.take_conversation(model) {
                prompts.insert(tokens, prefix, None);
            }
        }
        running.retain(|s| !s.is_finished());
        stats.running.store(running.len(), Ordering::SeqCst);
    }
}

/// One iteration over the running sequences.
fn step(
    model: &DeepseekVl2,
    config: &EngineConfig,
    running: &mut [Sequence],
    prompts: &mut PromptCache,
    stats: &EngineStats,
) {
    for seq in running.iter_mut().filter(|s| s.is_cancelled()) {
        seq.phase = crate::sequence::Phase::Finished;
    }
    // Decode first, so sequences already answering are not held up by a new prompt's prefill.
    let mut decoding: Vec<&mut Sequence> = running.iter_mut().filter(|s| s.next_token().is_some()).collect();
    if !decoding.is_empty() {
        let tokens: Vec<u32> = decoding.iter().map(|s| s.next_token().expect("filtered")).collect();
        let mut caches: Vec<_> = decoding.iter_mut().map(|s| &mut s.cache).collect();
        match model
            .step_batch(&tokens, &mut caches)
            .and_then(|l| Ok(l.to_vec2::<f32>()?))
        {
            Ok(rows) => {
                // Sampling with the hosted defaults costs ~0.4 ms per sequence (129280 scores through
                // the penalty, temperature and top-k): the sequences take it in parallel.
                decoding.par_iter_mut().zip(rows).for_each(|(seq, row)| seq.accept(row));
            }
            Err(e) => {
                for seq in decoding.iter_mut() {
                    seq.fail(&format!("decoding failed: {e}"));
                }
            }
        }
    }
    // Then one prefill chunk for the oldest sequence still prefilling. Prompts are prefilled one
    // after the other, so a prompt sent several times at once is computed once: the copies find it
    // in the prompt cache when their turn comes, and start from it without a chunk of their own (a
    // start after a kept prefix goes on prefilling, and is the chunk of this iteration).
    while let Some(seq) = running.iter_mut().find(|s| s.is_prefilling()) {
        if seq.prefill_pending() {
            if let Some(start) = prompts.find(seq.prompt()) {
                let skipped = seq.start_from(start);
                stats.prompt_cache_hits.fetch_add(1, Ordering::SeqCst);
                stats.prompt_cache_positions.fetch_add(skipped, Ordering::SeqCst);
                continue;
            }
        }
        match seq.prefill_chunk(model, config.prefill_chunk) {
            Ok(Some((tokens, prefix, logits))) => prompts.insert(tokens, prefix, Some(logits)),
            Ok(None) => {}
            Err(e) => seq.fail(&format!("prefill failed: {e}")),
        }
        break;
    }
}
