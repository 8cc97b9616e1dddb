//! Recently prefilled prompts and finished conversations, kept so that a request that starts the
//! same way skips that part of the work: the same prompt asked again (another sample, a regenerated
//! answer) starts from its frozen cache ([`SharedPrefix::branch`]) and the logits of its last
//! position, with neither the vision tower nor the prefill; the next turn of a chat (which resends
//! the whole conversation) starts from the longest kept prefix of it, images included, and prefills
//! only the rest. Sequences that branch from one prompt also share its positions when they decode
//! in one batch (the attention reads them once).
//!
//! Prefixes are matched exactly: token ids, and for every image within the prefix its placeholder
//! positions, tile grid and every pixel value (a SHA-256 per image). Entries are dropped oldest
//! first to stay within a byte budget; the memory an entry holds is freed when the last sequence
//! branched from it finishes.

use std::collections::VecDeque;

use dsvl2_model::SharedPrefix;
use dsvl2_processor::PreparedInput;
use sha2::{Digest, Sha256};

/// Fewest positions a kept prefix must give a request to be used (shorter ones are prefilled anew).
const MIN_SHARED: usize = 16;

/// What a request's language-model input depends on, in a form prefixes can be compared in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PromptTokens {
    ids: Vec<u32>,
    mask: Vec<bool>,
    images: Vec<ImageSpan>,
}

/// One image's placeholder positions and a digest of its tile grid and pixels.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ImageSpan {
    start: usize,
    end: usize,
    digest: [u8; 32],
}

impl PromptTokens {
    pub fn of(prepared: &PreparedInput) -> PromptTokens {
        let tile_values = 3 * prepared.tile_size * prepared.tile_size;
        let mut images = Vec::with_capacity(prepared.num_image_tokens.len());
        let mut position = 0;
        let mut tile = 0;
        for (i, &count) in prepared.num_image_tokens.iter().enumerate() {
            // Image i takes the next `count` image positions (one block in the reference's prompts).
            let slots: Vec<usize> = (position..prepared.images_seq_mask.len())
                .filter(|&p| prepared.images_seq_mask[p])
                .take(count)
                .collect();
            let (start, end) = match (slots.first(), slots.last()) {
                (Some(&first), Some(&last)) => (first, last + 1),
                _ => (position, position),
            };
            position = end;
            let [w, h] = prepared.images_spatial_crop.get(i).copied().unwrap_or([0, 0]);
            let tiles = 1 + w * h;
            let pixels = prepared
                .pixel_values
                .get(tile * tile_values..((tile + tiles) * tile_values).min(prepared.pixel_values.len()))
                .unwrap_or(&[]);
            tile += tiles;
            let mut hash = Sha256::new();
            part(&mut hash, b"grid", 2, [w, h].iter().map(|&c| (c as u64).to_le_bytes()));
            part(
                &mut hash,
                b"pixels",
                pixels.len(),
                pixels.iter().map(|p| p.to_bits().to_le_bytes()),
            );
            images.push(ImageSpan {
                start,
                end,
                digest: hash.finalize().into(),
            });
        }
        PromptTokens {
            ids: prepared.input_ids.clone(),
            mask: prepared.images_seq_mask.clone(),
            images,
        }
    }

    /// These tokens followed by `more` text tokens (an answer; no images).
    pub fn extended(&self, more: &[u32]) -> PromptTokens {
        let mut tokens = self.clone();
        tokens.ids.extend_from_slice(more);
        tokens.mask.extend(more.iter().map(|_| false));
        tokens
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// How many leading positions `self` and `other` have in common: the same ids, and every image
    /// that starts within them the same image at the same positions, wholly within them.
    fn common_len(&self, other: &PromptTokens) -> usize {
        let mut len = self
            .ids
            .iter()
            .zip(&other.ids)
            .zip(self.mask.iter().zip(&other.mask))
            .take_while(|((a, b), (m, n))| a == b && m == n)
            .count();
        for (i, image) in self.images.iter().enumerate() {
            if image.start >= len {
                break;
            }
            if other.images.get(i) != Some(image) || image.end > len {
                len = image.start;
                break;
            }
        }
        len
    }
}

/// Hashes one part of an image: its name and count first, so that no two different inputs write
/// the same bytes.
fn part<const N: usize>(hash: &mut Sha256, name: &[u8], count: usize, items: impl Iterator<Item = [u8; N]>) {
    hash.update(name);
    hash.update((count as u64).to_le_bytes());
    let mut buffer = Vec::with_capacity(4096);
    for item in items {
        buffer.extend_from_slice(&item);
        if buffer.len() + N > buffer.capacity() {
            hash.update(&buffer);
            buffer.clear();
        }
    }
    hash.update(&buffer);
}

/// Where a request can start (see [`PromptCache::find`]).
pub(crate) enum Start {
    /// The whole prompt is kept: its cache and the logits of its last position.
    Prefilled { prefix: SharedPrefix, logits: Vec<f32> },
    /// The first `len` positions (fewer than the prompt's) are kept in `prefix`.
    After { prefix: SharedPrefix, len: usize },
}

struct Entry {
    tokens: PromptTokens,
    /// Holds the positions of `tokens` (the first `tokens.len()` of it).
    prefix: SharedPrefix,
    /// The logits after the last position, for an entry made from a prefilled prompt (an exact
    /// repeat samples its first token from them); none for a finished conversation.
    logits: Option<Vec<f32>>,
    bytes: usize,
}

/// The kept prompts (see the module docs); newest first.
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

    /// The best start for a request of `tokens`: the whole prompt if it is kept, otherwise the
    /// longest kept prefix of at least [`MIN_SHARED`] positions, leaving at least one position to
    /// prefill (whose logits the first token needs). The entry used becomes the newest.
    pub fn find(&mut self, tokens: &PromptTokens) -> Option<Start> {
        let whole = self
            .entries
            .iter()
            .position(|e| e.logits.is_some() && e.tokens == *tokens);
        let (at, len) = match whole {
            Some(at) => (at, tokens.len()),
            None => self
                .entries
                .iter()
                .enumerate()
                .map(|(at, e)| (at, e.tokens.common_len(tokens).min(tokens.len() - 1)))
                .filter(|&(_, len)| len >= MIN_SHARED)
                .max_by_key(|&(at, len)| (len, std::cmp::Reverse(at)))?,
        };
        let entry = self.entries.remove(at).expect("found above");
        let start = match (&entry.logits, whole.is_some()) {
            (Some(logits), true) => Start::Prefilled {
                prefix: entry.prefix.clone(),
                logits: logits.clone(),
            },
            _ => Start::After {
                prefix: entry.prefix.clone(),
                len,
            },
        };
        self.entries.push_front(entry);
        Some(start)
    }

    /// Keeps the cache of `tokens` (with the logits after them for a prefilled prompt), dropping the
    /// oldest entries as the budget needs. One larger than the whole budget is not kept; one whose
    /// tokens another entry already holds replaces it, unless only the other has logits.
    pub fn insert(&mut self, tokens: PromptTokens, prefix: SharedPrefix, logits: Option<Vec<f32>>) {
        let bytes = prefix.bytes() + logits.as_ref().map_or(0, |l| l.len() * std::mem::size_of::<f32>());
        if bytes > self.budget || prefix.len() < tokens.len() {
            return;
        }
        if let Some(at) = self.entries.iter().position(|e| e.tokens == tokens) {
            if logits.is_none() && self.entries[at].logits.is_some() {
                return;
            }
            let old = self.entries.remove(at).expect("found above");
            self.used -= old.bytes;
        }
        while self.used + bytes > self.budget {
            let oldest = self.entries.pop_back().expect("used > 0 means entries");
            self.used -= oldest.bytes;
        }
        self.used += bytes;
        self.entries.push_front(Entry {
            tokens,
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

    fn image_prompt(ids: Vec<u32>, mask_at: std::ops::Range<usize>, pixel: f32) -> PreparedInput {
        let mut p = prepared(ids, vec![pixel; 3 * 2 * 2]);
        p.images_seq_mask[mask_at.clone()].fill(true);
        p.num_image_tokens = vec![mask_at.len()];
        p.images_spatial_crop = vec![[0, 0]];
        p.n_tiles = 1;
        p.tile_size = 2;
        p
    }

    #[test]
    fn prefixes_end_before_the_first_difference_or_image_that_differs() {
        let ids: Vec<u32> = (0..10).collect();
        let a = PromptTokens::of(&image_prompt(ids.clone(), 2..5, 0.5));
        assert_eq!(a.common_len(&a), 10);
        // A different id at 7: the common part ends there.
        let mut other = ids.clone();
        other[7] = 99;
        assert_eq!(a.common_len(&PromptTokens::of(&image_prompt(other, 2..5, 0.5))), 7);
        // A different pixel: the common part ends where the image starts.
        assert_eq!(
            a.common_len(&PromptTokens::of(&image_prompt(ids.clone(), 2..5, 0.25))),
            2
        );
        // A prefix that ends inside the image stops before it.
        let short = PromptTokens::of(&image_prompt(vec![0, 1, 2, 3], 2..4, 0.5));
        assert_eq!(a.common_len(&short), 2);
        // A text continuation of a prompt shares all of the prompt.
        let longer = a.extended(&[42, 43]);
        assert_eq!(longer.common_len(&a), 10);
        assert_eq!(longer.len(), 12);
    }

    /// The fixture tiny-like model's frozen cache after the text prompt `ids`, and its tokens.
    fn kept(model: &dsvl2_model::DeepseekVl2, ids: &[u32]) -> (PromptTokens, SharedPrefix) {
        let mut cache = model.new_cache();
        let embeds = model.language().embed(ids).unwrap();
        model.forward_embeds(&embeds, &mut cache, None).unwrap();
        (PromptTokens::of(&prepared(ids.to_vec(), Vec::new())), cache.share())
    }

    #[test]
    fn the_cache_finds_whole_prompts_and_longest_prefixes_within_its_budget() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/tiny-like");
        let dir = dsvl2_config::ModelDir::open(dir).unwrap();
        let model = dsvl2_model::DeepseekVl2::load(&dir, &dsvl2_model::Device::Cpu, dsvl2_model::DType::F32).unwrap();
        let ids: Vec<u32> = (1..=40).collect();
        let (a, a_cache) = kept(&model, &ids[..30]);
        let (b, b_cache) = kept(&model, &ids[..20]);
        let logits = vec![0.5f32; 4];
        // Room for these two caches (bytes grow with the positions held).
        let mut cache = PromptCache::new(a_cache.bytes() + b_cache.bytes() + 64);
        cache.insert(a.clone(), a_cache.clone(), Some(logits.clone()));
        cache.insert(b.clone(), b_cache, None);
        // The whole prompt with its logits.
        assert!(matches!(cache.find(&a), Some(Start::Prefilled { prefix, .. }) if prefix.len() == 30));
        // A longer prompt starting with `a`: after its 30 positions.
        let longer = PromptTokens::of(&prepared(ids.clone(), Vec::new()));
        assert!(matches!(cache.find(&longer), Some(Start::After { len: 30, .. })));
        // `b` has no logits: asked again, it is prefilled after all but its last position.
        assert!(matches!(cache.find(&b), Some(Start::After { len, .. }) if len == 19 ));
        // Too short a common part is not used.
        let other = PromptTokens::of(&prepared([&ids[..10], &[99; 20]].concat(), Vec::new()));
        assert!(cache.find(&other).is_none());
        // A conversation entry without logits does not replace the prompt's entry with them.
        cache.insert(a.clone(), a_cache.clone(), None);
        assert!(matches!(cache.find(&a), Some(Start::Prefilled { .. })));
        // A third cache as large as `b` drops the least recently used (`b`: `a` was just found).
        let (c, c_cache) = kept(&model, &[7; 20]);
        cache.insert(c.clone(), c_cache, None);
        assert!(cache.used <= cache.budget);
        assert!(matches!(cache.find(&a), Some(Start::Prefilled { .. })));
        assert!(!cache.entries.iter().any(|e| e.tokens == b));
        // `b`'s 20 tokens still start `a`'s: it goes on from there.
        assert!(matches!(cache.find(&b), Some(Start::After { len: 19, prefix }) if prefix.len() == 30));
        assert!(matches!(cache.find(&c), Some(Start::After { len: 19, .. })));
        // Nothing fits a budget of zero.
        let mut none = PromptCache::new(0);
        none.insert(a.clone(), a_cache, Some(logits));
        assert!(none.find(&a).is_none());
    }

    #[test]
    fn keys_tell_apart_every_input() {
        let of = |ids: Vec<u32>, pixels| PromptTokens::of(&prepared(ids, pixels));
        let base = of(vec![1, 2, 3], vec![0.5]);
        assert_eq!(base, of(vec![1, 2, 3], vec![0.5]));
        assert_ne!(base, of(vec![1, 2, 4], vec![0.5]));
        let image = |pixel: f32| PromptTokens::of(&image_prompt(vec![1, 2, 3, 4], 1..3, pixel));
        assert_eq!(image(0.5), image(0.5));
        assert_ne!(image(0.5), image(0.25));
        // -0.0 and 0.0 are different pixels to the digest (bit patterns).
        assert_ne!(image(0.0), image(-0.0));
        let mut masked = prepared(vec![1, 2, 3], vec![0.5]);
        masked.images_seq_mask[1] = true;
        assert_ne!(base, PromptTokens::of(&masked));
    }
}
