//! Checkpoint tensors: safetensors files opened by mmap, looked up by their official names.
//!
//! Every lookup checks the shape, converts bf16/f16/f32 storage to the compute dtype, and records
//! the name; [`Weights::finish`] then refuses a checkpoint with tensors nobody asked for, so a
//! renamed or misplaced tensor is an error instead of a silently random layer.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use dsvl2_config::WeightFiles;
use memmap2::Mmap;
use safetensors::SafeTensors;

use crate::ModelError;

/// Where one tensor lives.
struct Entry {
    file: usize,
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    /// Byte range inside the mmapped file.
    start: usize,
    end: usize,
}

/// All tensors of a checkpoint, mapped but not yet read.
pub struct Weights {
    files: Vec<(PathBuf, Mmap)>,
    entries: BTreeMap<String, Entry>,
    used: RefCell<BTreeSet<String>>,
    device: Device,
    dtype: DType,
    /// Called with (bytes loaded so far, total stored bytes) after each tensor.
    progress: Option<Box<dyn Fn(u64, u64)>>,
    loaded_bytes: Cell<u64>,
    /// Bytes of all stored tensors, as stored.
    total_bytes: u64,
}

impl Weights {
    /// Maps every weight file and indexes its tensors. For sharded checkpoints the index must
    /// agree with the shards' own headers.
    pub fn open(files: &WeightFiles, device: &Device, dtype: DType) -> Result<Self, ModelError> {
        let paths = files.files();
        let mut mapped = Vec::with_capacity(paths.len());
        let mut entries = BTreeMap::new();
        for (file_index, path) in paths.iter().enumerate() {
            let mmap = map_file(path)?;
            let st = SafeTensors::deserialize(&mmap).map_err(|e| ModelError::Weights {
                path: path.clone(),
                message: format!("not a valid safetensors file: {e}"),
            })?;
            let base = mmap.as_ptr() as usize;
            for (name, view) in st.tensors() {
                let data = view.data();
                let start = data.as_ptr() as usize - base;
                let entry = Entry {
                    file: file_index,
                    dtype: view.dtype(),
                    shape: view.shape().to_vec(),
                    start,
                    end: start + data.len(),
                };
                if let Some(previous) = entries.insert(name.clone(), entry) {
                    return Err(ModelError::Weights {
                        path: path.clone(),
                        message: format!("tensor `{name}` is also in {}", paths[previous.file].display()),
                    });
                }
            }
            mapped.push((path.clone(), mmap));
        }
        if let WeightFiles::Sharded { index, weight_map, .. } = files {
            for (name, file) in weight_map {
                match entries.get(name) {
                    Some(e) if &paths[e.file] == file => {}
                    Some(e) => {
                        return Err(ModelError::Weights {
                            path: index.clone(),
                            message: format!(
                                "`{name}` is listed in {} but stored in {}",
                                file.display(),
                                paths[e.file].display()
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
        Ok(Weights {
            files: mapped,
            used: RefCell::new(BTreeSet::new()),
            device: device.clone(),
            dtype,
            progress: None,
            loaded_bytes: Cell::new(0),
            total_bytes: entries.values().map(|e| (e.end - e.start) as u64).sum(),
            entries,
        })
    }

    /// Reports loading progress (bytes so far, total bytes) after each tensor.
    pub fn with_progress(mut self, progress: impl Fn(u64, u64) + 'static) -> Self {
        self.progress = Some(Box::new(progress));
        self
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
        let entry = self.entry(name)?;
        if entry.shape != shape {
            return Err(ModelError::TensorShape {
                name: name.to_string(),
                expected: shape.to_vec(),
                found: entry.shape.clone(),
            });
        }
        self.load(name, entry)
    }

    fn entry(&self, name: &str) -> Result<&Entry, ModelError> {
        let entry = self
            .entries
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor { name: name.to_string() })?;
        self.used.borrow_mut().insert(name.to_string());
        Ok(entry)
    }

    fn load(&self, name: &str, entry: &Entry) -> Result<Tensor, ModelError> {
        let (path, mmap) = &self.files[entry.file];
        let bytes = &mmap[entry.start..entry.end];
        let dtype = match entry.dtype {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::BF16 => DType::BF16,
            other => {
                return Err(ModelError::Weights {
                    path: path.clone(),
                    message: format!("tensor `{name}` has dtype {other:?}; expected F32, F16 or BF16"),
                })
            }
        };
        // from_raw_buffer copies out of the mmap (handling alignment); to_dtype widens in one pass.
        let tensor = Tensor::from_raw_buffer(bytes, dtype, &entry.shape, &self.device)?.to_dtype(self.dtype)?;
        if let Some(progress) = &self.progress {
            self.loaded_bytes.set(self.loaded_bytes.get() + bytes.len() as u64);
            progress(self.loaded_bytes.get(), self.total_bytes);
        }
        Ok(tensor)
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

fn map_file(path: &Path) -> Result<Mmap, ModelError> {
    let file = File::open(path).map_err(|e| ModelError::Weights {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    // SAFETY: the file is opened read-only and the map is only read. If another process truncates
    // the file while we run, reads could fault; that is the accepted risk of every mmap loader
    // (safetensors, candle, llama.cpp), and weights are copied out once at load time.
    unsafe { Mmap::map(&file) }.map_err(|e| ModelError::Weights {
        path: path.to_path_buf(),
        message: format!("cannot map: {e}"),
    })
}
