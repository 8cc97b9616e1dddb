//! Checkpoint tensors: safetensors files opened by mmap, looked up by their official names.
//!
//! Every lookup checks the shape, converts the stored values (bf16/f16/f32, or a GGUF block
//! format) to what the layer asks for, and records the name; [`Weights::finish`] then refuses a
//! checkpoint with tensors nobody asked for, so a renamed or misplaced tensor is an error instead
//! of a silently random layer. Linear weights are converted to the requested storage
//! [`Format`] here, at load time, in parallel (see [`crate::storage`] for which tensor gets what).

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use dsvl2_config::WeightFiles;
use dsvl2_kernels::{Format, PackedMatrix, SharedBytes};
use half::{bf16, f16};
use memmap2::{Mmap, MmapOptions};
use rayon::prelude::*;
use safetensors::SafeTensors;

use crate::storage::storage_format;
use crate::ModelError;

/// How a tensor's bytes are laid out in its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stored {
    /// Plain little-endian floats (safetensors F32/F16/BF16, GGUF F32/F16/BF16).
    Float(Format),
    /// A GGUF block format (q8_0, q4_k): served as is to linear layers, dequantized otherwise.
    Blocks(Format),
}

/// Where one tensor lives.
struct Entry {
    /// Index into [`Weights::sources`].
    source: usize,
    stored: Stored,
    shape: Vec<usize>,
    /// Byte range inside the source.
    start: usize,
    end: usize,
}

/// Where a GGUF file's quantized weight matrices (which the linear layers use as stored) are read
/// from while the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GgufWeights {
    /// In place, from a memory map of the file: the load is one read of the file, and processes using
    /// the same file share its pages through the OS page cache (llama.cpp's default too).
    #[default]
    Mapped,
    /// Copied at load into one anonymous buffer advised for 2 MiB pages. Decoding reads every active
    /// weight once per token and ran faster from there: tiny q8_0, batch 1, four interleaved pairs
    /// on a 2-vCPU Emerald Rapids VM, 2026-12-02, 26.3-30.1 tok/s mapped against 28.8-30.9 (means
    /// 27.95 and 30.1); after a 1039-token image prompt with an i8 cache, three pairs, 2026-12-03:
    /// 29.7-32.1 against 40.0-41.3 (batch 8: 160-168 against 186-193). The copy is fresh memory,
    /// which the kernel zeroes on first touch: on that VM the load went from 0.5-1 s to 2.7-8 s.
    InMemory,
}

/// Bytes that tensors are read from.
struct Source {
    /// The file the bytes come from (named in errors).
    path: PathBuf,
    bytes: Arc<Mmap>,
    /// Whether `bytes` maps the file itself, whose pages can be dropped once a tensor has been copied
    /// out (they fault back in from the file). Not for GGUF's in-memory copy of its block tensors,
    /// whose pages are the weights.
    file_backed: bool,
}

/// All tensors of a checkpoint, mapped but not yet read.
pub struct Weights {
    sources: Vec<Source>,
    entries: BTreeMap<String, Entry>,
    used: RefCell<BTreeSet<String>>,
    device: Device,
    dtype: DType,
    /// The storage format asked for linear weights (`--dtype`).
    format: Format,
    /// Called with (bytes loaded so far, total stored bytes) after each tensor.
    progress: Option<Box<dyn Fn(u64, u64)>>,
    loaded_bytes: Cell<u64>,
    /// Bytes of all stored tensors, as stored.
    total_bytes: u64,
}

impl Weights {
    /// Maps every weight file and indexes its tensors. For sharded checkpoints the index must
    /// agree with the shards' own headers. A GGUF file's quantized weights are used from the map.
    pub fn open(files: &WeightFiles, device: &Device, dtype: DType) -> Result<Self, ModelError> {
        Self::open_with(files, device, dtype, GgufWeights::Mapped)
    }

    /// [`Self::open`], with a GGUF file's quantized weights read from where `gguf` says.
    pub fn open_with(
        files: &WeightFiles,
        device: &Device,
        dtype: DType,
        gguf: GgufWeights,
    ) -> Result<Self, ModelError> {
        let (sources, entries) = match files {
            WeightFiles::Gguf { path, tensors } => open_gguf(path, tensors, gguf)?,
            _ => open_safetensors(files)?,
        };
        Ok(Weights {
            used: RefCell::new(BTreeSet::new()),
            device: device.clone(),
            dtype,
            format: Format::F32,
            progress: None,
            loaded_bytes: Cell::new(0),
            total_bytes: entries.values().map(|e| (e.end - e.start) as u64).sum(),
            sources,
            entries,
        })
    }

    /// Reports loading progress (bytes so far, total bytes) after each tensor.
    pub fn with_progress(mut self, progress: impl Fn(u64, u64) + 'static) -> Self {
        self.progress = Some(Box::new(progress));
        self
    }

    /// Stores linear weights in `format` (each in the best format its shape allows).
    pub fn with_format(mut self, format: Format) -> Self {
        self.format = format;
        self
    }

    /// The storage format requested for linear weights.
    pub fn format(&self) -> Format {
        self.format
    }

    /// Names of all stored tensors, sorted.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// The stored shape of `name`.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.entries.get(name).map(|e| e.shape.as_slice())
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// The tensor `name`, which must have exactly `shape`, in the compute dtype.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor, ModelError> {
        let entry = self.checked_entry(name, shape)?;
        let values = self.read_f32(name, entry)?;
        self.finished_reading(entry);
        Ok(Tensor::from_vec(values, shape, &self.device)?.to_dtype(self.dtype)?)
    }

    /// The linear weight `name` (`[rows, cols]` = `[out, in]`) in the storage format
    /// [`crate::storage_format`] picks for the requested format. A tensor already stored in a
    /// block format (GGUF) is used as stored.
    pub fn get_matrix(&self, name: &str, rows: usize, cols: usize) -> Result<PackedMatrix, ModelError> {
        let entry = self.checked_entry(name, &[rows, cols])?;
        let Source { path, bytes, .. } = &self.sources[entry.source];
        let matrix = match entry.stored {
            // Used in place (no copy, and nothing to release).
            Stored::Blocks(format) => {
                let source: SharedBytes = bytes.clone();
                PackedMatrix::from_shared(format, rows, cols, source, entry.start)
            }
            // Decoded a few rows at a time straight into the stored format: a whole f32 copy of
            // the tensor beside the converted one would be the load's peak memory.
            Stored::Float(stored) => {
                let format = storage_format(name, &entry.shape, self.format);
                let bytes = self.float_bytes(name, entry, stored)?;
                let row_bytes = cols * stored.block_bytes();
                PackedMatrix::from_rows(format, rows, cols, |first_row, out| {
                    decode_floats_into(stored, &bytes[first_row * row_bytes..], out)
                })
            }
        };
        let matrix = matrix.map_err(|e| ModelError::Weights {
            path: path.clone(),
            message: format!("tensor `{name}`: {e}"),
        })?;
        if let Stored::Float(_) = entry.stored {
            self.release_pages(entry);
        }
        self.report_progress(entry);
        Ok(matrix)
    }

    /// All values of `name` as f32, row-major, whatever its shape and stored format.
    pub fn get_f32(&self, name: &str) -> Result<Vec<f32>, ModelError> {
        let entry = self.entry(name)?;
        let values = self.read_f32(name, entry)?;
        self.finished_reading(entry);
        Ok(values)
    }

    fn checked_entry(&self, name: &str, shape: &[usize]) -> Result<&Entry, ModelError> {
        let entry = self.entry(name)?;
        if entry.shape != shape {
            return Err(ModelError::TensorShape {
                name: name.to_string(),
                expected: shape.to_vec(),
                found: entry.shape.clone(),
            });
        }
        Ok(entry)
    }

    fn entry(&self, name: &str) -> Result<&Entry, ModelError> {
        let entry = self
            .entries
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor { name: name.to_string() })?;
        self.used.borrow_mut().insert(name.to_string());
        Ok(entry)
    }

    fn bytes(&self, entry: &Entry) -> &[u8] {
        &self.sources[entry.source].bytes[entry.start..entry.end]
    }

    /// Decodes a tensor to f32 (in parallel: checkpoints are gigabytes of bf16).
    fn read_f32(&self, name: &str, entry: &Entry) -> Result<Vec<f32>, ModelError> {
        Ok(match entry.stored {
            Stored::Float(format) => decode_floats(format, self.float_bytes(name, entry, format)?),
            // GGUF float tensors: decoded straight from the file, like safetensors ones.
            Stored::Blocks(format) if format.block_len() == 1 => {
                decode_floats(format, self.float_bytes(name, entry, format)?)
            }
            Stored::Blocks(format) => {
                let elements: usize = entry.shape.iter().product();
                let cols = entry.shape.last().copied().unwrap_or(1);
                let rows = elements / cols.max(1);
                let matrix = PackedMatrix::from_bytes(format, rows, cols, self.bytes(entry)).map_err(|e| {
                    ModelError::Weights {
                        path: self.sources[entry.source].path.clone(),
                        message: format!("tensor `{name}`: {e}"),
                    }
                })?;
                let mut out = vec![0f32; elements];
                matrix.dequantize_rows(0, rows, &mut out);
                out
            }
        })
    }

    /// The bytes of a tensor of plain `format` floats, checked to hold exactly its shape's values.
    fn float_bytes(&self, name: &str, entry: &Entry, format: Format) -> Result<&[u8], ModelError> {
        let bytes = self.bytes(entry);
        let elements: usize = entry.shape.iter().product();
        if bytes.len() != elements * format.block_bytes() {
            return Err(ModelError::Weights {
                path: self.sources[entry.source].path.clone(),
                message: format!(
                    "tensor `{name}` holds {} bytes but its shape {:?} of {format:?} needs {}",
                    bytes.len(),
                    entry.shape,
                    elements * format.block_bytes()
                ),
            });
        }
        Ok(bytes)
    }

    /// Called once a tensor's bytes have been copied out: drops its file pages from this process
    /// (they stay in the OS page cache), so peak memory is the converted weights, not converted
    /// weights plus the whole mapped checkpoint. Then reports progress.
    fn finished_reading(&self, entry: &Entry) {
        self.release_pages(entry);
        self.report_progress(entry);
    }

    /// See [`Self::finished_reading`].
    fn release_pages(&self, entry: &Entry) {
        #[cfg(unix)]
        {
            let source = &self.sources[entry.source];
            if !source.file_backed {
                return;
            }
            // SAFETY: the map is read-only and file-backed, and no slice into this range outlives
            // the copy just made; after MADV_DONTNEED a later read simply faults the page back in
            // from the file. Failure only means the pages stay resident, so it is ignored.
            let _ = unsafe {
                source.bytes.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    entry.start,
                    entry.end - entry.start,
                )
            };
        }
    }

    fn report_progress(&self, entry: &Entry) {
        if let Some(progress) = &self.progress {
            self.loaded_bytes
                .set(self.loaded_bytes.get() + (entry.end - entry.start) as u64);
            progress(self.loaded_bytes.get(), self.total_bytes);
        }
    }

    /// Marks every tensor under `prefix` as known and deliberately unused (e.g. the SigLIP pooling
    /// head, present in the official checkpoints, which DeepSeek-VL2 never runs).
    pub fn skip_prefix(&self, prefix: &str) {
        let mut used = self.used.borrow_mut();
        for name in self.entries.keys().filter(|n| n.starts_with(prefix)) {
            used.insert(name.clone());
        }
    }

    /// Fails if the checkpoint holds tensors that were never asked for.
    pub fn finish(self) -> Result<(), ModelError> {
        let used = self.used.into_inner();
        let unused: Vec<String> = self.entries.keys().filter(|n| !used.contains(*n)).cloned().collect();
        if unused.is_empty() {
            return Ok(());
        }
        let shown: Vec<&str> = unused.iter().take(8).map(String::as_str).collect();
        Err(ModelError::UnexpectedTensors {
            count: unused.len(),
            names: shown.join(", "),
        })
    }

    /// Total bytes of all stored tensors (as stored, before conversion).
    pub fn stored_bytes(&self) -> u64 {
        self.total_bytes
    }
}

/// Little-endian f32/f16/bf16 bytes to f32, in parallel chunks.
fn decode_floats(format: Format, bytes: &[u8]) -> Vec<f32> {
    const CHUNK: usize = 1 << 16;
    let width = format.block_bytes();
    let mut out = vec![0f32; bytes.len() / width];
    out.par_chunks_mut(CHUNK)
        .zip(bytes.par_chunks(CHUNK * width))
        .for_each(|(out, bytes)| decode_floats_into(format, bytes, out));
    out
}

/// The first `out.len()` little-endian f32/f16/bf16 values of `bytes`, as f32.
fn decode_floats_into(format: Format, bytes: &[u8], out: &mut [f32]) {
    let values = bytes.chunks_exact(format.block_bytes());
    match format {
        Format::F16 => out
            .iter_mut()
            .zip(values)
            .for_each(|(o, b)| *o = f16::from_le_bytes([b[0], b[1]]).to_f32()),
        Format::Bf16 => out
            .iter_mut()
            .zip(values)
            .for_each(|(o, b)| *o = bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        _ => out
            .iter_mut()
            .zip(values)
            .for_each(|(o, b)| *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
    }
}

type Opened = (Vec<Source>, BTreeMap<String, Entry>);

/// Maps safetensors files (one, or the shards of an index, which must agree with their headers).
fn open_safetensors(files: &WeightFiles) -> Result<Opened, ModelError> {
    let paths = files.files();
    let mut sources = Vec::with_capacity(paths.len());
    let mut entries = BTreeMap::new();
    for (file_index, path) in paths.iter().enumerate() {
        let mmap = map_file(path, false)?;
        let st = SafeTensors::deserialize(&mmap).map_err(|e| ModelError::Weights {
            path: path.clone(),
            message: format!("not a valid safetensors file: {e}"),
        })?;
        let base = mmap.as_ptr() as usize;
        for (name, view) in st.tensors() {
            let data = view.data();
            let start = data.as_ptr() as usize - base;
            let stored = match view.dtype() {
                safetensors::Dtype::F32 => Format::F32,
                safetensors::Dtype::F16 => Format::F16,
                safetensors::Dtype::BF16 => Format::Bf16,
                other => {
                    return Err(ModelError::Weights {
                        path: path.clone(),
                        message: format!("tensor `{name}` has dtype {other:?}; expected F32, F16 or BF16"),
                    })
                }
            };
            let entry = Entry {
                source: file_index,
                stored: Stored::Float(stored),
                shape: view.shape().to_vec(),
                start,
                end: start + data.len(),
            };
            if let Some(previous) = entries.insert(name.clone(), entry) {
                return Err(ModelError::Weights {
                    path: path.clone(),
                    message: format!("tensor `{name}` is also in {}", paths[previous.source].display()),
                });
            }
        }
        sources.push(Source {
            path: path.clone(),
            bytes: Arc::new(mmap),
            file_backed: true,
        });
    }
    if let WeightFiles::Sharded { index, weight_map, .. } = files {
        for (name, file) in weight_map {
            match entries.get(name) {
                Some(e) if &paths[e.source] == file => {}
                Some(e) => {
                    return Err(ModelError::Weights {
                        path: index.clone(),
                        message: format!(
                            "`{name}` is listed in {} but stored in {}",
                            file.display(),
                            paths[e.source].display()
                        ),
                    })
                }
                None => {
                    return Err(ModelError::Weights {
                        path: index.clone(),
                        message: format!("`{name}` is listed in {} but not stored there", file.display()),
                    })
                }
            }
        }
    }
    Ok((sources, entries))
}

/// Opens a GGUF file whose header `ModelDir` has already read and checked (offsets are absolute and
/// inside the file). Every tensor is used as stored: the file's formats were chosen when it was
/// written, by the same rule the loader uses. The block tensors (q8_0, q4_k), which the linear layers
/// use in place, are read from the map or from an in-memory copy, as `gguf` says; the float tensors
/// (norms, embeddings) are converted at load from the map.
fn open_gguf(path: &Path, tensors: &[dsvl2_config::GgufTensorInfo], gguf: GgufWeights) -> Result<Opened, ModelError> {
    const FILE: usize = 0;
    const BLOCKS: usize = 1;
    let weights_error = |message: String| ModelError::Weights {
        path: path.to_path_buf(),
        message,
    };
    let in_memory = gguf == GgufWeights::InMemory;
    // Mapped: read the whole file in at once (every page will be needed), so the load takes the time
    // of reading the file instead of page faults during the first request.
    let mapped = map_file(path, !in_memory)?;
    let mut entries = BTreeMap::new();
    // (file offset, offset in the block buffer, length) of each block tensor copied.
    let mut copies = Vec::new();
    let mut buffer_len = 0;
    for t in tensors {
        let format = Format::from_ggml_type(t.ggml_type)
            .ok_or_else(|| weights_error(format!("tensor `{}` has unsupported ggml type {}", t.name, t.ggml_type)))?;
        let (start, len) = (t.offset as usize, t.nbytes as usize);
        if start.checked_add(len).is_none_or(|end| end > mapped.len()) {
            return Err(weights_error(format!(
                "tensor `{}` lies past the end of the file",
                t.name
            )));
        }
        let (source, start) = if in_memory && format.block_len() > 1 {
            // Each tensor starts on a cache line, as the kernels' own copies do.
            let offset = buffer_len;
            copies.push((start, offset, len));
            buffer_len += len.next_multiple_of(64);
            (BLOCKS, offset)
        } else {
            (FILE, start)
        };
        let entry = Entry {
            source,
            stored: Stored::Blocks(format),
            shape: t.shape.clone(),
            start,
            end: start + len,
        };
        entries.insert(t.name.clone(), entry);
    }
    let source = |bytes: Mmap, file_backed| Source {
        path: path.to_path_buf(),
        bytes: Arc::new(bytes),
        file_backed,
    };
    let blocks = if in_memory {
        Some(read_into_huge_pages(path, &mapped, buffer_len.max(1), &copies)?)
    } else {
        None
    };
    let mut sources = vec![source(mapped, true)];
    sources.extend(blocks.map(|blocks| source(blocks, false)));
    Ok((sources, entries))
}

/// A read-only anonymous buffer of `len` bytes holding, for each `(file offset, offset, len)` of
/// `copies`, those bytes of the file (`mapped`) at that offset, read in parallel.
fn read_into_huge_pages(
    path: &Path,
    #[cfg_attr(unix, allow(unused_variables))] mapped: &Mmap,
    len: usize,
    copies: &[(usize, usize, usize)],
) -> Result<Mmap, ModelError> {
    let error = |e: std::io::Error| ModelError::Weights {
        path: path.to_path_buf(),
        message: format!("cannot read the block tensors: {e}"),
    };
    let mut buffer = MmapOptions::new().len(len).map_anon().map_err(error)?;
    // Best effort: without transparent huge pages (or on a kernel that refuses) it stays 4 KiB pages.
    #[cfg(target_os = "linux")]
    let _ = buffer.advise(memmap2::Advice::HugePage);
    // Disjoint destination slices, one per tensor (in buffer order, as `copies` was built).
    let mut rest: &mut [u8] = &mut buffer;
    let mut consumed = 0;
    let mut jobs = Vec::with_capacity(copies.len());
    for &(file_offset, offset, n) in copies {
        let (_, tail) = std::mem::take(&mut rest).split_at_mut(offset - consumed);
        let (dst, tail) = tail.split_at_mut(n);
        jobs.push((file_offset, dst));
        rest = tail;
        consumed = offset + n;
    }
    #[cfg(unix)]
    {
        // Straight from the page cache into the buffer: the file's own mapping is never touched, so
        // its pages do not count against this process as well.
        use std::os::unix::fs::FileExt;
        let file = File::open(path).map_err(error)?;
        jobs.into_par_iter()
            .try_for_each(|(file_offset, dst)| file.read_exact_at(dst, file_offset as u64))
            .map_err(error)?;
    }
    #[cfg(not(unix))]
    jobs.into_par_iter()
        .for_each(|(file_offset, dst)| dst.copy_from_slice(&mapped[file_offset..file_offset + dst.len()]));
    buffer.make_read_only().map_err(error)
}

/// Maps `path` read-only; `populate` reads the whole file in now (`MAP_POPULATE`).
fn map_file(path: &Path, populate: bool) -> Result<Mmap, ModelError> {
    let file = File::open(path).map_err(|e| ModelError::Weights {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let mut options = MmapOptions::new();
    if populate {
        options.populate();
    }
    // SAFETY: the file is opened read-only and the map is only read. If another process truncates
    // or rewrites the file while we run, reads could fault or see the new bytes; that is the
    // accepted risk of every mmap loader (safetensors, candle, llama.cpp, which also runs GGUF
    // weights in place as we do).
    unsafe { options.map(&file) }.map_err(|e| ModelError::Weights {
        path: path.to_path_buf(),
        message: format!("cannot map: {e}"),
    })
}
