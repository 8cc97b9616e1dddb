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
