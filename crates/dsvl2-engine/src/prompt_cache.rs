//! Recently prefilled prompts, kept so that the same prompt asked again (a regenerated answer,
//! another sample, a client asking for several answers one request at a time) skips the vision
//! tower and the prefill: a new request whose prompt matches one of them starts from that prompt's
//! frozen cache ([`SharedPrefix::branch`]) and the logits of its last position. Sequences that branch
//! from one prompt also share its positions when they decode in one batch (the attention reads them
//! once).
//!
//! A prompt is matched exactly: its token ids, image positions, image layout and every pixel value
//! (a SHA-256 of them all, [`PromptKey`]). Entries are dropped oldest first to stay within a byte
//! budget; memory an entry holds is freed when the last sequence branched from it finishes.

use std::collections::VecDeque;

use dsvl2_model::SharedPrefix;
use dsvl2_processor::PreparedInput;
use sha2::{Digest, Sha256};

/// What identifies a prompt's prefill: everything the language model's input depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PromptKey([u8; 32]);

impl PromptKey {
    pub fn of(prepared: &PreparedInput) -> PromptKey {
        let mut hash = Sha256::new();
        let ids = &prepared.input_ids;
        part(&mut hash, b"ids", ids.len(), ids.iter().flat_map(|i| i.to_le_bytes()));
        let mask = &prepared.images_seq_mask;
        part(&mut hash, b"mask", mask.len(), mask.iter().map(|&m| m as u8));
        let crops = &prepared.images_spatial_crop;
        let crop_bytes = crops.iter().flatten().flat_map(|&c| (c as u64).to_le_bytes());
        part(&mut hash, b"crops", crops.len(), crop_bytes);
        let pixels = &prepared.pixel_values;
        part(
            &mut hash,
            b"pixels",
            pixels.len(),
            pixels.iter().flat_map(|p| p.to_bits().to_le_bytes()),
        );
        PromptKey(hash.finalize().into())
    }
}

/// Hashes one part of a prompt: its name and count first, so that no two different inputs write the
/// same bytes.
fn part(hash: &mut Sha256, name: &[u8], count: usize, bytes: impl Iterator<Item = u8>) {
    hash.update(name);
    hash.update((count as u64).to_le_bytes());
    let mut buffer = Vec::with_capacity(4096);
    for byte in bytes {
        buffer.push(byte);
        if buffer.len() == buffer.capacity() {
            hash.update(&buffer);
            buffer.clear();
        }
    }
    hash.update(&buffer);
}

struct Entry {
    key: PromptKey,
    prefix: SharedPrefix,
    /// The logits of the prompt's last position (the first answer token is sampled from them).
    logits: Vec<f32>,
    bytes: usize,
}

/// The cache of prefilled prompts (see the module docs); newest first.
pub(crate) struct PromptCache {
    entries: VecDeque<Entry>,
    budget: usize,
    used: usize,
}

impl PromptCache {
    /// A cache holding at most `budget` bytes of frozen caches (0: none).
    pub fn new(budget: usize) -> Self {
        PromptCache {
            entries: VecDeque::new(),
            budget,
            used: 0,
        }
    }

    /// The frozen cache and last logits of the prompt `key`, if it is held (it becomes the newest).
    pub fn get(&mut self, key: &PromptKey) -> Option<(SharedPrefix, Vec<f32>)> {
        let at = self.entries.iter().position(|e| e.key == *key)?;
        let entry = self.entries.remove(at).expect("found above");
        let found = (entry.prefix.clone(), entry.logits.clone());
        self.entries.push_front(entry);
        Some(found)
    }

    /// Keeps a prefilled prompt, dropping the oldest entries as the budget needs. A prompt larger
    /// than the whole budget is not kept.
    pub fn insert(&mut self, key: PromptKey, prefix: SharedPrefix, logits: Vec<f32>) {
        let bytes = prefix.bytes() + logits.len() * std::mem::size_of::<f32>();
        if bytes > self.budget || self.entries.iter().any(|e| e.key == key) {
            return;
        }
        while self.used + bytes > self.budget {
            let oldest = self.entries.pop_back().expect("used > 0 means entries");
            self.used -= oldest.bytes;
        }
        self.used += bytes;
        self.entries.push_front(Entry {
            key,
            prefix,
            logits,
            bytes,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prepared(ids: Vec<u32>, pixels: Vec<f32>) -> PreparedInput {
        PreparedInput {
            sft_format: String::new(),
            images_seq_mask: vec![false; ids.len()],
            input_ids: ids,
            images_spatial_crop: Vec::new(),
            num_image_tokens: Vec::new(),
            n_tiles: 0,
            tile_size: 0,
            pixel_values: pixels,
        }
    }

    #[test]
    fn keys_tell_apart_every_input() {
        let base = PromptKey::of(&prepared(vec![1, 2, 3], vec![0.5]));
        assert_eq!(base, PromptKey::of(&prepared(vec![1, 2, 3], vec![0.5])));
        assert_ne!(base, PromptKey::of(&prepared(vec![1, 2, 4], vec![0.5])));
        assert_ne!(base, PromptKey::of(&prepared(vec![1, 2, 3], vec![0.25])));
        // -0.0 and 0.0 are different pixels to the key (bit patterns).
        let zero = PromptKey::of(&prepared(vec![1], vec![0.0]));
        assert_ne!(zero, PromptKey::of(&prepared(vec![1], vec![-0.0])));
        let mut masked = prepared(vec![1, 2, 3], vec![0.5]);
        masked.images_seq_mask[1] = true;
        assert_ne!(base, PromptKey::of(&masked));
    }
}
