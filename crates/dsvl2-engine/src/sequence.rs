//! One request while the scheduler runs it: its cache, sampler, text and channel.

use std::time::Instant;

use dsvl2_model::{DeepseekVl2, FinishReason, ModelError, Sampler, SequenceCache, SharedPrefix, Tensor};
use dsvl2_processor::{AnswerText, Processor};

use crate::prompt_cache::{PromptTokens, Start};
use crate::{Completion, Event, Job};

pub(crate) enum Phase {
    /// `done` of the prompt's positions are in the cache; `embeds` holds those from `from` on (the
    /// ones before came from the prompt cache).
    Prefill {
        embeds: Option<Tensor>,
        done: usize,
        from: usize,
    },
    /// The next step feeds `next`.
    Decode {
        next: u32,
    },
    Finished,
}

pub(crate) struct Sequence<'p> {
    job: Job,
    pub cache: SequenceCache,
    pub phase: Phase,
    sampler: Sampler,
    text: AnswerText<'p>,
    /// Prompt and generated ids: what the repetition penalty sees.
    seen: Vec<u32>,
    tokens: Vec<u32>,
    eos: u32,
    /// Whether it ended with an answer (not cancelled, not failed).
    completed: bool,
    admitted: Instant,
    first_token: Option<Instant>,
}

impl<'p> Sequence<'p> {
    pub fn new(job: Job, model: &DeepseekVl2, processor: &'p Processor) -> Self {
        let request = &job.request;
        Sequence {
            cache: model.new_cache(),
            phase: Phase::Prefill {
                embeds: None,
                done: 0,
                from: 0,
            },
            sampler: Sampler::new(request.sampling.clone()),
            text: AnswerText::new(processor, &request.stop),
            seen: request.prepared.input_ids.clone(),
            tokens: Vec::new(),
            eos: processor.eos_id(),
            completed: false,
            admitted: Instant::now(),
            first_token: None,
            job,
        }
    }

    /// What the prompt cache compares this sequence's prompt by.
    pub fn prompt(&self) -> &PromptTokens {
        &self.job.prompt
    }

    /// Whether the prefill has not begun (nothing of the prompt computed yet).
    pub fn prefill_pending(&self) -> bool {
        matches!(
            self.phase,
            Phase::Prefill {
                embeds: None,
                done: 0,
                ..
            }
        )
    }

    /// Starts from what the prompt cache holds: the whole prompt (its first token is sampled at
    /// once) or its first positions (the prefill goes on after them). Returns the positions skipped.
    pub fn start_from(&mut self, start: Start) -> usize {
        match start {
            Start::Prefilled { prefix, logits } => {
                self.cache = prefix.branch();
                self.accept(logits);
                prefix.len()
            }
            Start::After { prefix, len } => {
                self.cache = prefix.branch();
                self.cache.truncate(len);
                self.phase = Phase::Prefill {
                    embeds: None,
                    done: len,
                    from: len,
                };
                len
            }
        }
    }

    /// The whole conversation so far (prompt and answer) and its frozen cache, once the sequence
    /// has completed: a chat's next turn starts with it.
    pub fn take_conversation(&mut self, model: &DeepseekVl2) -> Option<(PromptTokens, SharedPrefix)> {
        if !self.completed {
            return None;
        }
        self.completed = false;
        let prompt_len = self.job.request.prepared.input_ids.len();
        // The cache holds every token but the last one sampled.
        let answer = self.seen.get(prompt_len..self.cache.len())?;
        let tokens = self.job.prompt.extended(answer);
        let cache = std::mem::replace(&mut self.cache, model.new_cache());
        Some((tokens, cache.share()))
    }

    /// The client is gone: nobody reads this sequence any more.
    pub fn is_cancelled(&self) -> bool {
        self.job.events.is_closed()
    }

    pub fn is_finished(&self) -> bool {
        matches!(self.phase, Phase::Finished)
    }

    pub fn is_prefilling(&self) -> bool {
        matches!(self.phase, Phase::Prefill { .. })
    }

    pub fn next_token(&self) -> Option<u32> {
        match self.phase {
            Phase::Decode { next } => Some(next),
            _ => None,
        }
    }

    /// Runs the next chunk of the prompt (the vision tower first, on the first call). After the
    /// last chunk the first token is sampled, and the prompt's cache is frozen: this sequence goes
    /// on as a branch of it, and it is returned with its tokens and logits for the prompt cache (so a
    /// sequence that hits the cache later decodes exactly as this one).
    pub fn prefill_chunk(
        &mut self,
        model: &DeepseekVl2,
        chunk: usize,
    ) -> Result<Option<(PromptTokens, SharedPrefix, Vec<f32>)>, ModelError> {
        let Phase::Prefill { embeds, done, from } = &mut self.phase else {
            return Ok(None);
        };
        let prepared = &self.job.request.prepared;
        if embeds.is_none() {
            *embeds = Some(crate::embed_prepared_from(model, prepared, *from)?);
        }
        let all = embeds.as_ref().expect("embeds computed above");
        let len = prepared.input_ids.len();
        let n = chunk.max(1).min(len - *done);
        let logits = model.forward_embeds(&all.narrow(0, *done - *from, n)?, &mut self.cache, None)?;
        *done += n;
        if *done < len {
            return Ok(None);
        }
        let prefix = std::mem::replace(&mut self.cache, model.new_cache()).share();
        self.cache = prefix.branch();
        let logits: Vec<f32> = logits.to_vec1()?;
        self.accept(logits.clone());
        Ok(Some((self.job.prompt.clone(), prefix, logits)))
    }

    /// Takes the logits of this sequence's latest position: samples, streams, decides whether to go on.
    pub fn accept(&mut self, logits: Vec<f32>) {
        let token = self.sampler.next(logits, &self.seen);
        self.first_token.get_or_insert_with(Instant::now);
        self.seen.push(token);
        self.tokens.push(token);
        match self.text.push(token) {
            Ok(delta) => self.send_delta(delta),
            Err(e) => return self.fail(&format!("cannot decode the answer: {e}")),
        }
        if token == self.eos || self.text.stopped() {
            self.finish(FinishReason::Stop);
        } else if self.tokens.len() >= self.job.request.max_new_tokens {
            self.finish(FinishReason::Length);
        } else if !self.is_finished() {
            self.phase = Phase::Decode { next: token };
        }
    }

    fn send_delta(&mut self, delta: String) {
        if !delta.is_empty() && self.job.events.send(Event::Delta(delta)).is_err() {
            self.phase = Phase::Finished; // cancelled
        }
    }

    fn finish(&mut self, finish_reason: FinishReason) {
        match self.text.finish() {
            Ok(tail) => self.send_delta(tail),
            Err(e) => return self.fail(&format!("cannot decode the answer: {e}")),
        }
        let now = Instant::now();
        let first = self.first_token.unwrap_or(now);
        let completion = Completion {
            text: self.text.text().to_string(),
            tokens: std::mem::take(&mut self.tokens),
            finish_reason,
            prompt_tokens: self.job.request.prepared.input_ids.len(),
            queue_seconds: (self.admitted - self.job.submitted).as_secs_f64(),
            first_token_seconds: (first - self.job.submitted).as_secs_f64(),
            decode_seconds: (now - first).as_secs_f64(),
        };
        let _ = self.job.events.send(Event::Done(completion));
        self.completed = true;
        self.phase = Phase::Finished;
    }

    /// Ends the request with an error message for the client.
    pub fn fail(&mut self, message: &str) {
        let _ = self.job.events.send(Event::Failed(message.to_string()));
        self.phase = Phase::Finished;
    }
}
