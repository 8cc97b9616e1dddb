//! Incremental detokenization: text is emitted as soon as it is final, never half a character.
//!
//! Byte-level BPE splits one character (CJK, emoji) over several tokens; decoding such a prefix
//! gives U+FFFD. We decode a small window of recent ids and only emit text once the window's
//! decode grows without ending in U+FFFD (the approach of TGI's `decode_token`).

use crate::{Processor, ProcessorError};

/// Turns a stream of token ids into a stream of text pieces whose concatenation equals the full
/// decode (`skip_special_tokens=false`).
pub struct TextStream<'a> {
    processor: &'a Processor,
    ids: Vec<u32>,
    /// Start of the window whose decode is used as the reference prefix.
    prefix_offset: usize,
    /// End of what has been emitted.
    read_offset: usize,
}

impl<'a> TextStream<'a> {
    pub fn new(processor: &'a Processor) -> Self {
        TextStream {
            processor,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }

    /// Adds one token; returns the text that became final (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String, ProcessorError> {
        self.ids.push(id);
        let prefix = self
            .processor
            .decode(&self.ids[self.prefix_offset..self.read_offset], false)?;
        let text = self.processor.decode(&self.ids[self.prefix_offset..], false)?;
        if text.len() > prefix.len() && !text.ends_with('\u{FFFD}') && text.starts_with(&prefix) {
            let new = text[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            return Ok(new);
        }
        Ok(String::new())
    }

    /// Whatever is still held back (an incomplete character decodes to U+FFFD, as the reference's
    /// full decode would show it).
    pub fn finish(&mut self) -> Result<String, ProcessorError> {
        let prefix = self
            .processor
            .decode(&self.ids[self.prefix_offset..self.read_offset], false)?;
        let text = self.processor.decode(&self.ids[self.prefix_offset..], false)?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(text
            .strip_prefix(prefix.as_str())
            .map(str::to_string)
            .unwrap_or_default())
    }
}

/// Stop strings over streamed text: text is released only once it cannot be the start of a stop
/// string, and generation ends at the first stop string, which is not part of the answer.
#[derive(Debug, Clone, Default)]
pub struct StopStrings {
    stops: Vec<String>,
    pending: String,
    stopped: bool,
}

impl StopStrings {
    /// Empty strings are ignored (they would stop before the first character).
    pub fn new(stops: &[String]) -> Self {
        StopStrings {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            pending: String::new(),
            stopped: false,
        }
    }

    /// Adds newly decoded text; returns the text that is now safe to show.
    pub fn push(&mut self, text: &str) -> String {
        if self.stopped {
            return String::new();
        }
        self.pending.push_str(text);
        let first_stop = self.stops.iter().filter_map(|s| self.pending.find(s.as_str())).min();
        if let Some(at) = first_stop {
            self.stopped = true;
            self.pending.truncate(at);
            return std::mem::take(&mut self.pending);
        }
        // Hold back the longest tail that could still grow into a stop string.
        let hold = self
            .stops
            .iter()
            .flat_map(|s| (1..s.len()).filter(|&n| s.is_char_boundary(n)).map(move |n| &s[..n]))
            .filter(|prefix| self.pending.ends_with(prefix))
            .map(str::len)
            .max()
            .unwrap_or(0);
        let release = self.pending.len() - hold;
        let rest = self.pending.split_off(release);
        std::mem::replace(&mut self.pending, rest)
    }

    /// Whether a stop string was seen.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// The held-back tail, at the end of generation.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

/// The answer text of one generation: incremental detokenization, stop strings and the
/// end-of-sentence token in one place, so every front end shows the same text.
pub struct AnswerText<'a> {
    stream: TextStream<'a>,
    stops: StopStrings,
    eos: u32,
    text: String,
}

impl<'a> AnswerText<'a> {
    pub fn new(processor: &'a Processor, stops: &[String]) -> Self {
        AnswerText {
            stream: TextStream::new(processor),
            stops: StopStrings::new(stops),
            eos: processor.eos_id(),
            text: String::new(),
        }
    }

    /// Adds a generated token; returns the text that became final (possibly empty). The EOS token
    /// adds nothing.
    pub fn push(&mut self, token: u32) -> Result<String, ProcessorError> {
        if token == self.eos || self.stops.stopped() {
            return Ok(String::new());
        }
        let delta = self.stops.push(&self.stream.push(token)?);
        self.text.push_str(&delta);
        Ok(delta)
    }

    /// Whether a stop string ended the answer.
    pub fn stopped(&self) -> bool {
        self.stops.stopped()
    }

    /// At the end of generation: whatever was held back.
    pub fn finish(&mut self) -> Result<String, ProcessorError> {
        if self.stops.stopped() {
            return Ok(String::new());
        }
        let tail = self.stream.finish()?;
        let delta = self.stops.push(&tail) + &self.stops.finish();
        self.text.push_str(&delta);
        Ok(delta)
    }

    /// The answer so far (all deltas returned until now).
    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn into_text(self) -> String {
        self.text
    }
}

#[cfg(test)]
mod tests {
    use super::StopStrings;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut s = StopStrings::new(&stops);
        let mut out = String::new();
        for p in pieces {
            out += &s.push(p);
            if s.stopped() {
                return (out, true);
            }
        }
        out += &s.finish();
        (out, false)
    }

    #[test]
    fn stops_at_a_string_split_over_pieces_and_never_shows_it() {
        assert_eq!(
            run(&["</answer>"], &["The cat", " sat</an", "swer> more"]),
            ("The cat sat".into(), true)
        );
        assert_eq!(run(&["STOP", "\n\n"], &["a\n", "\nb"]), ("a".into(), true));
    }

    #[test]
    fn releases_held_text_when_it_cannot_be_a_stop() {
        let stops = vec!["</x>".to_string()];
        let mut s = StopStrings::new(&stops);
        assert_eq!(s.push("hi </"), "hi ");
        assert_eq!(s.push("y>"), "</y>");
        assert_eq!(run(&["</x>"], &["a </", "x"]), ("a </x".into(), false));
        assert_eq!(run(&[], &["plain", " text"]), ("plain text".into(), false));
        assert_eq!(run(&["猫猫"], &["犬猫", "犬"]), ("犬猫犬".into(), false));
    }
}
