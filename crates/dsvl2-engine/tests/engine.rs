//! The engine: concurrent requests give their sequential answers, streams add up, cancellation
//! frees the slot, and limits are enforced at submission.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dsvl2_config::ModelDir;
use dsvl2_engine::{Completion, Engine, EngineConfig, Event, GenerateRequest, SubmitError};
use dsvl2_model::{DType, DeepseekVl2, Device, FinishReason, SamplingParams};
use dsvl2_processor::{Conversation, Message, PreparedInput, Processor};
use tokio::sync::mpsc::UnboundedReceiver;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn start(variant: &str, config: EngineConfig) -> (Engine, Arc<Processor>) {
    let dir = ModelDir::open(fixtures().join("models").join(variant)).unwrap();
    let processor = Arc::new(Processor::from_model_dir(&dir).unwrap());
    let model = DeepseekVl2::load(&dir, &Device::Cpu, DType::F32).unwrap();
    (Engine::start(model, processor.clone(), config), processor)
}

fn prepare(processor: &Processor, prompt: &str, images: &[&str]) -> PreparedInput {
    let images = images.iter().map(|i| fixtures().join("images").join(i)).collect();
    processor
        .prepare_with_files(&Conversation::single_turn(prompt, images), "")
        .unwrap()
}

fn greedy(prepared: PreparedInput, max_new_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        prepared,
        sampling: SamplingParams::greedy(),
        max_new_tokens,
        stop: Vec::new(),
    }
}

/// Reads a request's events to the end: (deltas joined, completion).
fn collect(mut rx: UnboundedReceiver<Event>) -> (String, Completion) {
    let mut text = String::new();
    while let Some(event) = rx.blocking_recv() {
        match event {
            Event::Delta(d) => text.push_str(&d),
            Event::Done(c) => return (text, c),
            Event::Failed(e) => panic!("request failed: {e}"),
        }
    }
    panic!("the stream ended without Done");
}

#[test]
fn concurrent_requests_get_their_sequential_answers() {
    let (engine, processor) = start("small-like", EngineConfig::default());
    let requests = [
        greedy(
            prepare(
                &processor,
                "Describe each stage of this <image> in detail.",
                &["wide_street.png"],
            ),
            24,
        ),
        greedy(prepare(&processor, "Tell me a long story about the sea.", &[]), 30),
        greedy(prepare(&processor, "<image>\nWhat is this?", &["small_photo.png"]), 12),
    ];
    // One at a time.
    let alone: Vec<(String, Completion)> = requests
        .iter()
        .map(|r| collect(engine.submit(r.clone()).unwrap()))
        .collect();
    // All at once: prefills interleave with batched decode steps.
    let receivers: Vec<_> = requests.iter().map(|r| engine.submit(r.clone()).unwrap()).collect();
    let together: Vec<(String, Completion)> = receivers.into_iter().map(collect).collect();
    for (i, ((text_a, a), (text_b, b))) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a.tokens, b.tokens, "request {i}: batching changed the greedy tokens");
        assert_eq!(a.text, b.text);
        assert_eq!(text_a, &a.text, "request {i}: deltas do not add up to the text");
        assert_eq!(text_b, &b.text);
        assert_eq!(a.finish_reason, FinishReason::Length);
    }
    // And the first one is the reference's answer (tests/fixtures/cases/single_wide).
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("cases/single_wide/small-like.json")).unwrap())
            .unwrap();
    let ids: Vec<u32> = serde_json::from_value(expected["generated_ids"].clone()).unwrap();
    assert_eq!(together[0].1.tokens, ids);
    assert_eq!(together[0].1.prompt_tokens, 831);
}

/// Two tiny-like engines: one that keeps prompts (the default) and one that keeps none.
fn warm_and_cold() -> (Engine, Engine, Arc<Processor>) {
    let (warm, processor) = start("tiny-like", EngineConfig::default());
    let no_cache = EngineConfig {
        prompt_cache_bytes: 0,
        ..EngineConfig::default()
    };
    (warm, start("tiny-like", no_cache).0, processor)
}

/// A prompt asked again (same text, same image) starts from the kept prefill: no vision tower, no
/// prefill, and exactly the answer an engine that keeps nothing gives, greedy or sampled; another
/// image misses, and copies of a prompt sent together are prefilled once.
#[test]
fn a_repeated_prompt_starts_from_its_kept_prefill() {
    let (engine, cold, processor) = warm_and_cold();
    let prompt = prepare(&processor, "<image>\nWhat is this?", &["small_photo.png"]);
    let hits = |e: &Engine| e.stats().prompt_cache_hits.load(Ordering::SeqCst);
    let first = collect(engine.submit(greedy(prompt.clone(), 16)).unwrap()).1;
    assert_eq!(hits(&engine), 0);
    let again = collect(engine.submit(greedy(prompt.clone(), 16)).unwrap()).1;
    assert_eq!(hits(&engine), 1);
    assert_eq!(again.tokens, first.tokens);
    assert_eq!(again.text, first.text);
    // Sampled answers with two seeds, both at once (they decode together as branches of one prompt),
    // against the engine that keeps nothing.
    let sampled = |seed| GenerateRequest {
        sampling: SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed,
            ..SamplingParams::default()
        },
        ..greedy(prompt.clone(), 16)
    };
    let receivers: Vec<_> = [3, 4].map(|seed| engine.submit(sampled(seed)).unwrap()).into();
    let warm: Vec<Completion> = receivers.into_iter().map(|r| collect(r).1).collect();
    assert_eq!(hits(&engine), 3);
    for (seed, warm) in [3, 4].into_iter().zip(&warm) {
        let cold = collect(cold.submit(sampled(seed)).unwrap()).1;
        assert_eq!(
            warm.tokens, cold.tokens,
            "seed {seed}: the kept prompt changed the answer"
        );
    }
    assert_eq!(hits(&cold), 0);
    assert_ne!(warm[0].tokens, warm[1].tokens, "two seeds, two answers");
    // Another image with the same text is another prompt; sent three times at once, it is
    // prefilled once (prompts are prefilled one after the other, the copies find the first's).
    let other = prepare(&processor, "<image>\nWhat is this?", &["wide_street.png"]);
    let receivers: Vec<_> = (0..3)
        .map(|_| engine.submit(greedy(other.clone(), 4)).unwrap())
        .collect();
    let answers: Vec<Completion> = receivers.into_iter().map(|r| collect(r).1).collect();
    assert_eq!(hits(&engine), 5);
    assert!(answers.iter().all(|a| a.tokens == answers[0].tokens));
    assert_ne!(answers[0].tokens, first.tokens);
}

/// A chat's next turn resends the whole conversation: it starts after the kept first turn (prompt
/// and answer, image included), prefills only what is new, and answers as an engine that keeps
/// nothing does.
#[test]
fn a_chat_turn_starts_after_the_kept_conversation() {
    let (engine, cold, processor) = warm_and_cold();
    let image = fixtures().join("images").join("small_photo.png");
    let question = "<image>\nWhat is this?";
    let first_turn = processor
        .prepare_with_files(&Conversation::single_turn(question, vec![image.clone()]), "")
        .unwrap();
    let answer = collect(engine.submit(greedy(first_turn.clone(), 12)).unwrap()).1;
    let conversation = Conversation {
        messages: vec![
            Message::user(question, vec![image]),
            Message::assistant(answer.text.clone()),
            Message::user("And what colours does it have?", Vec::new()),
            Message::assistant(""),
        ],
    };
    let second_turn = processor.prepare_with_files(&conversation, "").unwrap();
    let stats = engine.stats();
    let (hits, skipped) = (&stats.prompt_cache_hits, &stats.prompt_cache_positions);
    assert_eq!(hits.load(Ordering::SeqCst), 0);
    let warm = collect(engine.submit(greedy(second_turn.clone(), 12)).unwrap()).1;
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    let skipped = skipped.load(Ordering::SeqCst);
    let (first_len, second_len) = (first_turn.input_ids.len(), second_turn.input_ids.len());
    eprintln!("second turn: {second_len} positions, {skipped} from the first turn's {first_len} + answer");
    assert!(
        skipped >= first_len - 1 && skipped < second_len,
        "{skipped} positions reused of {second_len}"
    );
    let cold = collect(cold.submit(greedy(second_turn, 12)).unwrap()).1;
    assert_eq!(warm.tokens, cold.tokens, "the kept conversation changed the answer");
}

#[test]
fn a_dropped_receiver_frees_the_slot() {
    let (engine, processor) = start(
        "tiny-like",
        EngineConfig {
            max_running: 1,
            ..EngineConfig::default()
        },
    );
    let long = greedy(prepare(&processor, "Go on forever.", &[]), 4000);
    let mut rx = engine.submit(long).unwrap();
    // Wait until it is generating, then walk away.
    assert!(matches!(rx.blocking_recv(), Some(Event::Delta(_))));
    drop(rx);
    // The single slot must come free for the next request well before 4000 tokens are done.
    let started = Instant::now();
    let (_, done) = collect(engine.submit(greedy(prepare(&processor, "hi", &[]), 3)).unwrap());
    assert_eq!(done.tokens.len(), 3);
    assert!(started.elapsed() < Duration::from_secs(20));
    // `Done` is sent before the scheduler drops the finished sequence: wait (bounded) for the count.
    let deadline = Instant::now() + Duration::from_secs(5);
    while engine.stats().running.load(Ordering::SeqCst) != 0 {
        assert!(Instant::now() < deadline, "the finished sequence was never released");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn limits_are_enforced_at_submission() {
    let (engine, processor) = start(
        "tiny-like",
        EngineConfig {
            max_queue: 1,
            max_running: 1,
            prefill_chunk: 64,
            ..EngineConfig::default()
        },
    );
    let too_long = greedy(prepare(&processor, "hi", &[]), 5000);
    let err = engine.submit(too_long).unwrap_err().to_string();
    assert!(
        err.contains("plus 5000 new tokens, but the model's context is 4096 tokens"),
        "{err}"
    );
    let err = engine.submit(greedy(prepare(&processor, "hi", &[]), 0)).unwrap_err();
    assert!(matches!(err, SubmitError::Invalid(_)), "{err}");

    // One running, one waiting: the rest are refused, not queued without bound.
    let mut accepted = Vec::new();
    let mut refused = 0;
    for _ in 0..6 {
        match engine.submit(greedy(prepare(&processor, "Go on.", &[]), 200)) {
            Ok(rx) => accepted.push(rx),
            Err(SubmitError::QueueFull { capacity }) => {
                assert_eq!(capacity, 1);
                refused += 1;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(refused >= 3, "only {refused} of 6 refused with a queue of 1");
    for rx in accepted {
        collect(rx);
    }
}

#[test]
fn stop_strings_and_eos_end_a_request_with_stop() {
    let (engine, processor) = start("tiny-like", EngineConfig::default());
    let (_, full) = collect(
        engine
            .submit(greedy(prepare(&processor, "hello there", &[]), 16))
            .unwrap(),
    );
    // Stop at a piece of the greedy answer: the answer ends right before it.
    let cut = full.text.char_indices().nth(full.text.chars().count() / 2).unwrap().0;
    let stop = full.text[cut..].chars().take(3).collect::<String>();
    let mut request = greedy(prepare(&processor, "hello there", &[]), 16);
    request.stop = vec![stop.clone()];
    let (streamed, stopped) = collect(engine.submit(request).unwrap());
    assert_eq!(stopped.finish_reason, FinishReason::Stop);
    assert_eq!(stopped.text, full.text[..full.text.find(&stop).unwrap()]);
    assert_eq!(streamed, stopped.text);
}

#[test]
fn shutdown_finishes_running_requests_and_refuses_new_ones() {
    let (engine, processor) = start("tiny-like", EngineConfig::default());
    let rx = engine.submit(greedy(prepare(&processor, "hello", &[]), 8)).unwrap();
    let waiter = std::thread::spawn(move || collect(rx));
    engine.shutdown();
    let (_, done) = waiter.join().unwrap();
    assert_eq!(done.tokens.len(), 8);
    assert!(matches!(
        engine.submit(greedy(prepare(&processor, "hello", &[]), 8)),
        Err(SubmitError::ShuttingDown)
    ));
}
