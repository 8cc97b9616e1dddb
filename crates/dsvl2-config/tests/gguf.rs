//! The GGUF reader and writer: round trips, agreement with candle's `gguf_file` both ways, clear
//! errors (never a panic) on damaged files, and a model folder packed into one GGUF.

use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use dsvl2_config::gguf::{self, ggml_type, keys, GgufDataWriter, GgufFile, GgufValue, GgufWriter};
use dsvl2_config::{ModelDir, TokenizerSource, WeightFiles};

fn fixture_model(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
}

fn ggml_id(dtype: GgmlDType) -> u32 {
    match dtype {
        GgmlDType::F32 => ggml_type::F32,
        GgmlDType::F16 => ggml_type::F16,
        GgmlDType::BF16 => ggml_type::BF16,
        GgmlDType::Q8_0 => ggml_type::Q8_0,
        GgmlDType::Q4K => ggml_type::Q4_K,
        other => panic!("not used here: {other:?}"),
    }
}

fn values(n: usize, seed: f32) -> Vec<f32> {
    (0..n).map(|i| (i as f32 * 0.37 + seed).sin() * 2.0).collect()
}

/// (name, candle dtype, shape) of the test tensors: every supported type, 1 to 4 dims.
fn test_tensors() -> Vec<(&'static str, GgmlDType, Vec<usize>)> {
    vec![
        ("norm.weight", GgmlDType::F32, vec![5]),
        ("conv.weight", GgmlDType::F32, vec![3, 2, 2, 7]),
        ("half.weight", GgmlDType::F16, vec![3, 9]),
        ("q8.weight", GgmlDType::Q8_0, vec![4, 64]),
        ("q8.stack", GgmlDType::Q8_0, vec![2, 3, 32]),
        ("q4k.weight", GgmlDType::Q4K, vec![3, 512]),
    ]
}

fn quantized(dtype: GgmlDType, shape: &[usize], seed: f32) -> QTensor {
    let n = shape.iter().product();
    let t = Tensor::from_vec(values(n, seed), shape, &Device::Cpu).unwrap();
    QTensor::quantize(&t, dtype).unwrap()
}

fn all_value_types() -> Vec<(&'static str, GgufValue)> {
    vec![
        ("t.u8", GgufValue::U8(200)),
        ("t.i8", GgufValue::I8(-5)),
        ("t.u16", GgufValue::U16(60000)),
        ("t.i16", GgufValue::I16(-30000)),
        ("t.u32", GgufValue::U32(4_000_000_000)),
        ("t.i32", GgufValue::I32(-2_000_000_000)),
        ("t.f32", GgufValue::F32(1.5)),
        ("t.bool", GgufValue::Bool(true)),
        ("t.string", GgufValue::String("héllo ｜▁".into())),
        ("t.u64", GgufValue::U64(u64::MAX)),
        ("t.i64", GgufValue::I64(i64::MIN)),
        ("t.f64", GgufValue::F64(-2.25)),
        (
            "t.strings",
            GgufValue::Array {
                item_type: gguf::value_type::STRING,
                items: vec!["a".into(), "".into(), "ccc".into()],
            },
        ),
        (
            "t.empty",
            GgufValue::Array {
                item_type: gguf::value_type::I32,
                items: vec![],
            },
        ),
        (
            "t.nested",
            GgufValue::Array {
                item_type: gguf::value_type::ARRAY,
                items: vec![GgufValue::Array {
                    item_type: gguf::value_type::U8,
                    items: vec![GgufValue::U8(1), GgufValue::U8(2)],
                }],
            },
        ),
    ]
}

/// Writes the test tensors (candle-quantized data) with our writer; returns the file bytes and the
/// tensors written.
fn write_ours() -> (Vec<u8>, Vec<(String, QTensor)>) {
    let mut plan = GgufWriter::new();
    plan.add_metadata(keys::ARCHITECTURE, gguf::ARCHITECTURE).unwrap();
    for (k, v) in all_value_types() {
        plan.add_metadata(k, v).unwrap();
    }
    let mut tensors = Vec::new();
    for (i, (name, dtype, shape)) in test_tensors().into_iter().enumerate() {
        let q = quantized(dtype, &shape, i as f32);
        let nbytes = plan.add_tensor(name, ggml_id(dtype), &shape).unwrap();
        assert_eq!(nbytes as usize, q.storage_size_in_bytes(), "{name}");
        tensors.push((name.to_string(), q));
    }
    let expected_size = plan.file_size();
    let mut data: GgufDataWriter<Vec<u8>> = plan.begin(Vec::new()).unwrap();
    for (name, q) in &tensors {
        assert_eq!(data.next_tensor().unwrap().name, *name);
        data.write_tensor(name, &q.data().unwrap()).unwrap();
    }
    let bytes = data.finish().unwrap();
    assert_eq!(bytes.len() as u64, expected_size);
    (bytes, tensors)
}

#[test]
fn round_trip_keeps_metadata_shapes_offsets_and_data() {
    let (bytes, tensors) = write_ours();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.gguf");
    std::fs::write(&path, &bytes).unwrap();
    let file = GgufFile::open(&path).unwrap();
    assert_eq!(file, GgufFile::from_bytes(&bytes, &path).unwrap());
    assert_eq!(&bytes[..4], b"GGUF");
    assert_eq!(file.version, 3);
    assert_eq!(file.alignment, 32);
    assert_eq!(file.data_offset % 32, 0);
    assert_eq!(file.file_size, bytes.len() as u64);
    assert_eq!(file.get(keys::ALIGNMENT), Some(&GgufValue::U32(32)));
    assert_eq!(file.get_str(keys::ARCHITECTURE), Some("deepseek-vl2"));
    for (k, v) in all_value_types() {
        assert_eq!(file.get(k), Some(&v), "{k}");
    }
    assert_eq!(file.tensors.len(), tensors.len());
    for (info, (name, q)) in file.tensors.iter().zip(&tensors) {
        assert_eq!(&info.name, name);
        assert_eq!(info.shape, q.shape().dims());
        assert_eq!(info.ggml_type, ggml_id(q.dtype()));
        assert_eq!(info.offset % 32, 0);
        assert!(info.offset >= file.data_offset);
        let range = info.byte_range();
        assert_eq!(
            &bytes[range.start as usize..range.end as usize],
            &q.data().unwrap()[..],
            "{name}"
        );
    }
    assert_eq!(file.tensor("q4k.weight").unwrap().nbytes, 3 * 2 * 144);
}

#[test]
fn candle_reads_our_file() {
    let (bytes, tensors) = write_ours();
    let ours = GgufFile::from_bytes(&bytes, "ours.gguf").unwrap();
    let mut cursor = std::io::Cursor::new(&bytes);
    let content = gguf_file::Content::read(&mut cursor).unwrap();
    assert!(matches!(content.magic, gguf_file::VersionedMagic::GgufV3));
    assert_eq!(content.tensor_data_offset, ours.data_offset);
    assert_eq!(
        content.metadata["general.architecture"].to_string().unwrap(),
        "deepseek-vl2"
    );
    assert_eq!(content.metadata["t.u64"].to_u64().unwrap(), u64::MAX);
    assert_eq!(content.metadata["t.strings"].to_vec().unwrap().len(), 3);
    assert_eq!(content.tensor_infos.len(), tensors.len());
    for info in &ours.tensors {
        let theirs = &content.tensor_infos[&info.name];
        assert_eq!(theirs.shape.dims(), &info.shape[..], "{}", info.name);
        assert_eq!(ggml_id(theirs.ggml_dtype), info.ggml_type, "{}", info.name);
        assert_eq!(content.tensor_data_offset + theirs.offset, info.offset, "{}", info.name);
    }
    // The data candle reads back dequantizes to what candle's own tensor does.
    for (name, q) in &tensors {
        let read = content.tensor(&mut cursor, name, &Device::Cpu).unwrap();
        let a: Vec<f32> = read
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let b: Vec<f32> = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(a, b, "{name}");
    }
}

#[test]
fn we_read_a_file_written_by_candle() {
    let qs: Vec<(&str, QTensor)> = test_tensors()
        .into_iter()
        .enumerate()
        .map(|(i, (name, dtype, shape))| (name, quantized(dtype, &shape, i as f32)))
        .collect();
    let arch = gguf_file::Value::String("deepseek-vl2".into());
    let arr = gguf_file::Value::Array(vec![gguf_file::Value::I32(1), gguf_file::Value::I32(-2)]);
    let flag = gguf_file::Value::Bool(false);
    let mut cursor = std::io::Cursor::new(Vec::new());
    let metadata = [("general.architecture", &arch), ("x.array", &arr), ("x.flag", &flag)];
    let tensor_refs: Vec<(&str, &QTensor)> = qs.iter().map(|(n, q)| (*n, q)).collect();
    gguf_file::write(&mut cursor, &metadata, &tensor_refs).unwrap();
    let bytes = cursor.into_inner();

    let ours = GgufFile::from_bytes(&bytes, "candle.gguf").unwrap();
    assert_eq!(ours.version, 2, "candle writes version 2");
    assert_eq!(ours.get_str("general.architecture"), Some("deepseek-vl2"));
    assert_eq!(
        ours.get("x.array"),
        Some(&GgufValue::Array {
            item_type: gguf::value_type::I32,
            items: vec![GgufValue::I32(1), GgufValue::I32(-2)]
        })
    );
    assert_eq!(ours.get("x.flag"), Some(&GgufValue::Bool(false)));
    let content = gguf_file::Content::read(&mut std::io::Cursor::new(&bytes)).unwrap();
    assert_eq!(ours.data_offset, content.tensor_data_offset);
    for (name, q) in &qs {
        let info = ours.tensor(name).unwrap();
        assert_eq!(info.shape, q.shape().dims());
        assert_eq!(info.ggml_type, ggml_id(q.dtype()));
        assert_eq!(
            info.offset,
            content.tensor_data_offset + content.tensor_infos[*name].offset
        );
        assert_eq!(info.nbytes as usize, q.storage_size_in_bytes());
        let r = info.byte_range();
        assert_eq!(
            &bytes[r.start as usize..r.end as usize],
            &q.data().unwrap()[..],
            "{name}"
        );
    }
}

fn small_file() -> Vec<u8> {
    let mut plan = GgufWriter::new();
    plan.add_metadata(keys::ARCHITECTURE, gguf::ARCHITECTURE).unwrap();
    plan.add_metadata(
        "x.list",
        GgufValue::Array {
            item_type: gguf::value_type::STRING,
            items: vec!["one".into(), "two".into()],
        },
    )
    .unwrap();
    plan.add_tensor("a", ggml_type::F32, &[2, 3]).unwrap();
    plan.add_tensor("b", ggml_type::Q8_0, &[1, 32]).unwrap();
    let mut data = plan.begin(Vec::new()).unwrap();
    data.write_tensor("a", &[1u8; 24]).unwrap();
    data.write_tensor("b", &[2u8; 34]).unwrap();
    data.finish().unwrap()
}

fn read_err(bytes: &[u8]) -> String {
    GgufFile::from_bytes(bytes, "/m/bad.gguf").unwrap_err().to_string()
}

#[test]
fn damaged_files_give_errors_naming_the_file_and_the_fault() {
    let good = small_file();
    let file = GgufFile::from_bytes(&good, "x").unwrap();

    // Every truncation is an error, never a panic; cuts inside the data name the tensor. (Only the
    // last tensor's padding may be cut off: its data is complete.)
    let data_end = file.tensor("b").unwrap().byte_range().end as usize;
    assert!(GgufFile::from_bytes(&good[..data_end], "x").is_ok());
    for len in 0..data_end {
        let err = read_err(&good[..len]);
        assert!(err.starts_with("/m/bad.gguf: "), "{len}: {err}");
        if len >= 4 {
            assert!(err.contains("truncated"), "{len}: {err}");
        }
        if len as u64 >= file.data_offset {
            let a_end = file.tensor("a").unwrap().byte_range().end;
            let tensor = if len as u64 >= a_end {
                "tensor `b`"
            } else {
                "tensor `a`"
            };
            assert!(err.contains(tensor) && err.contains("past the end"), "{len}: {err}");
        }
    }
    let err = read_err(&good[..160]);
    assert!(err.contains("while reading"), "{err}");

    let mut bad = good.clone();
    bad[..4].copy_from_slice(b"PK\x03\x04");
    let err = read_err(&bad);
    assert!(err.contains("not a GGUF file") && err.contains("bad magic"), "{err}");
    assert!(read_err(b"GG").contains("not a GGUF file"));

    let mut v1 = good.clone();
    v1[4..8].copy_from_slice(&1u32.to_le_bytes());
    assert!(read_err(&v1).contains("unsupported GGUF version 1"));

    let type_pos = find_type_field(&good, "b");
    let mut q4_0 = good.clone();
    q4_0[type_pos..type_pos + 4].copy_from_slice(&2u32.to_le_bytes());
    let err = read_err(&q4_0);
    assert!(
        err.contains("tensor `b`") && err.contains("ggml type 2 (Q4_0) is not supported"),
        "{err}"
    );
    let mut unknown = good.clone();
    unknown[type_pos..type_pos + 4].copy_from_slice(&999u32.to_le_bytes());
    assert!(read_err(&unknown).contains("ggml type 999 (unknown)"));

    // Offset not aligned.
    let mut misaligned = good.clone();
    misaligned[type_pos + 4..type_pos + 12].copy_from_slice(&33u64.to_le_bytes());
    assert!(read_err(&misaligned).contains("not a multiple of the alignment"));
    // Offset past the end.
    let mut far = good.clone();
    far[type_pos + 4..type_pos + 12].copy_from_slice(&(1u64 << 40).to_le_bytes());
    assert!(read_err(&far).contains("past the end"));

    // A huge declared array length is refused before allocating.
    let list_len_pos = find(&good, b"x.list") + 6 + 4 + 4; // key, value type, item type
    let mut huge = good.clone();
    huge[list_len_pos..list_len_pos + 8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    assert!(read_err(&huge).contains("truncated"));

    // A missing file names the path.
    let err = GgufFile::open("/nonexistent/x.gguf").unwrap_err().to_string();
    assert!(err.contains("/nonexistent/x.gguf"), "{err}");
}

fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).position(|w| w == needle).expect("present")
}

/// Position of the ggml type field of tensor `name` (a one-byte name, 2 dims max here).
fn find_type_field(bytes: &[u8], name: &str) -> usize {
    let mut key = (name.len() as u64).to_le_bytes().to_vec();
    key.extend_from_slice(name.as_bytes());
    // The last occurrence is the tensor info (metadata keys come first).
    let pos = bytes.windows(key.len()).rposition(|w| w == key).unwrap();
    let dims_pos = pos + key.len();
    let n_dims = u32::from_le_bytes(bytes[dims_pos..dims_pos + 4].try_into().unwrap()) as usize;
    dims_pos + 4 + 8 * n_dims
}

#[test]
fn writer_refuses_what_a_reader_could_not_use() {
    let mut plan = GgufWriter::new();
    assert!(plan
        .add_tensor("q", ggml_type::Q8_0, &[4, 30])
        .unwrap_err()
        .to_string()
        .contains("not a multiple"));
    assert!(plan
        .add_tensor("k", ggml_type::Q4_K, &[4, 128])
        .unwrap_err()
        .to_string()
        .contains("256"));
    assert!(plan.add_tensor("x", 2, &[32]).unwrap_err().to_string().contains("Q4_0"));
    assert!(plan
        .add_tensor("x", ggml_type::F32, &[1, 1, 1, 1, 1])
        .unwrap_err()
        .to_string()
        .contains("at most 4"));
    assert!(plan.add_metadata(keys::ALIGNMENT, 64u32).is_err());
    plan.add_metadata("k", "v").unwrap();
    assert!(plan
        .add_metadata("k", "w")
        .unwrap_err()
        .to_string()
        .contains("duplicate"));
    let mixed = GgufValue::Array {
        item_type: gguf::value_type::U8,
        items: vec![GgufValue::U8(1), GgufValue::I8(1)],
    };
    assert!(plan.add_metadata("m", mixed).is_err());

    plan.add_tensor("a", ggml_type::F32, &[2]).unwrap();
    plan.add_tensor("b", ggml_type::BF16, &[3]).unwrap();
    assert!(plan
        .add_tensor("a", ggml_type::F32, &[2])
        .unwrap_err()
        .to_string()
        .contains("duplicate"));
    let mut data = plan.clone().begin(Vec::new()).unwrap();
    assert!(data
        .write_tensor("b", &[0; 6])
        .unwrap_err()
        .to_string()
        .contains("where `a` was declared"));
    assert!(data
        .write_tensor("a", &[0; 7])
        .unwrap_err()
        .to_string()
        .contains("7 bytes given, 8 declared"));
    data.write_tensor("a", &[0; 8]).unwrap();
    let err = data.finish().unwrap_err().to_string();
    assert!(
        err.contains("1 of 2 tensors were not written") && err.contains("`b`"),
        "{err}"
    );
}

/// Packs a fixture folder's JSON files into a GGUF (tensors: a placeholder unless given).
fn pack_folder(folder: &Path, config_override: Option<&str>, skip: &[&str]) -> Vec<u8> {
    let read = |f: &str| std::fs::read_to_string(folder.join(f)).unwrap();
    let mut plan = GgufWriter::new();
    plan.add_metadata(keys::ARCHITECTURE, gguf::ARCHITECTURE).unwrap();
    plan.add_metadata(keys::NAME, "tiny-like").unwrap();
    for (key, file) in [
        (keys::CONFIG_JSON, "config.json"),
        (keys::PROCESSOR_CONFIG_JSON, "processor_config.json"),
        (keys::TOKENIZER_JSON, "tokenizer.json"),
        (keys::TOKENIZER_CONFIG_JSON, "tokenizer_config.json"),
        (keys::SPECIAL_TOKENS_MAP_JSON, "special_tokens_map.json"),
    ] {
        if skip.contains(&key) {
            continue;
        }
        let text = match (key, config_override) {
            (keys::CONFIG_JSON, Some(text)) => text.to_string(),
            _ => read(file),
        };
        plan.add_metadata(key, text).unwrap();
    }
    plan.add_tensor("language.lm_head.weight", ggml_type::F32, &[2, 4])
        .unwrap();
    let mut data = plan.begin(Vec::new()).unwrap();
    data.write_tensor("language.lm_head.weight", &[0; 32]).unwrap();
    data.finish().unwrap()
}

#[test]
fn model_dir_opens_a_gguf_like_its_folder() {
    let folder = fixture_model("tiny-like");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    std::fs::write(&path, pack_folder(&folder, None, &[])).unwrap();

    let from_folder = ModelDir::open(&folder).unwrap();
    let from_gguf = ModelDir::open(&path).unwrap();
    assert_eq!(from_gguf.root, path);
    assert_eq!(from_gguf.config, from_folder.config);
    assert_eq!(from_gguf.processor, from_folder.processor);
    assert_eq!(from_gguf.tokenizer.bos_token, from_folder.tokenizer.bos_token);
    assert_eq!(from_gguf.tokenizer.eos_token, from_folder.tokenizer.eos_token);
    assert_eq!(from_gguf.tokenizer.pad_token, from_folder.tokenizer.pad_token);
    assert_eq!(from_gguf.tokenizer.tokenizer_json, path);
    match &from_gguf.tokenizer.source {
        TokenizerSource::Embedded { container, key, json } => {
            assert_eq!(container, &path);
            assert_eq!(key, "tokenizer.huggingface.json");
            assert_eq!(&**json, std::fs::read_to_string(folder.join("tokenizer.json")).unwrap());
        }
        other => panic!("expected embedded tokenizer, got {other:?}"),
    }
    assert_eq!(
        from_folder.tokenizer.source,
        TokenizerSource::File(folder.join("tokenizer.json"))
    );
    match &from_gguf.weights {
        WeightFiles::Gguf { path: p, tensors } => {
            assert_eq!(p, &path);
            assert_eq!(tensors.len(), 1);
            assert_eq!(tensors[0].shape, vec![2, 4]);
            assert_eq!(tensors[0].offset % 32, 0);
        }
        other => panic!("expected GGUF weights, got {other:?}"),
    }
    assert_eq!(from_gguf.weights.files(), vec![path.clone()]);
}

#[test]
fn model_gguf_errors_name_the_file_and_the_metadata_key() {
    let folder = fixture_model("tiny-like");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");

    std::fs::write(&path, pack_folder(&folder, Some("{ not json"), &[])).unwrap();
    let err = ModelDir::open(&path).unwrap_err().to_string();
    assert!(
        err.contains("m.gguf (metadata `dsvl2.config_json`): invalid JSON"),
        "{err}"
    );

    let config = std::fs::read_to_string(folder.join("config.json"))
        .unwrap()
        .replace("\"greedy\"", "\"bogus\"");
    std::fs::write(&path, pack_folder(&folder, Some(&config), &[])).unwrap();
    let err = ModelDir::open(&path).unwrap_err().to_string();
    assert!(
        err.contains("(metadata `dsvl2.config_json`)") && err.contains("topk_method"),
        "{err}"
    );

    std::fs::write(&path, pack_folder(&folder, None, &[keys::TOKENIZER_JSON])).unwrap();
    let err = ModelDir::open(&path).unwrap_err().to_string();
    assert!(err.contains("missing metadata `tokenizer.huggingface.json`"), "{err}");

    std::fs::write(&path, pack_folder(&folder, None, &[keys::PROCESSOR_CONFIG_JSON])).unwrap();
    let err = ModelDir::open(&path).unwrap_err().to_string();
    assert!(err.contains("missing metadata `dsvl2.processor_config_json`"), "{err}");

    std::fs::write(&path, b"GGUF\x03\x00\x00\x00").unwrap();
    let err = ModelDir::open(&path).unwrap_err().to_string();
    assert!(err.contains("m.gguf") && err.contains("truncated"), "{err}");

    std::fs::write(&path, b"{\"not\": \"gguf\"}").unwrap();
    let err = ModelDir::open(&path).unwrap_err().to_string();
    assert!(err.contains("m.gguf: not a GGUF file"), "{err}");

    // A GGUF of another architecture.
    let mut plan = GgufWriter::new();
    plan.add_metadata(keys::ARCHITECTURE, "llama").unwrap();
    std::fs::write(&path, plan.begin(Vec::new()).unwrap().finish().unwrap()).unwrap();
    let err = ModelDir::open(&path).unwrap_err().to_string();
    assert!(err.contains("general.architecture") && err.contains("llama"), "{err}");
}

/// dsvl2's interleaved q8_0 type has q8_0's size and needs whole groups of 16 rows; a row that ends
/// in a partial block (SigLIP's fc2: 4304 values) takes a whole block, where plain q8_0 refuses it.
#[test]
fn interleaved_q8_0_type() {
    let t = ggml_type::DSVL2_Q8_0_R16;
    assert_eq!(
        gguf::ggml_nbytes(t, &[32, 64]),
        gguf::ggml_nbytes(ggml_type::Q8_0, &[32, 64])
    );
    assert_eq!(gguf::ggml_nbytes(t, &[1152, 4304]), Ok(1152 * 135 * 34));
    assert!(gguf::ggml_nbytes(ggml_type::Q8_0, &[1152, 4304]).is_err());
    let e = gguf::ggml_nbytes(t, &[40, 64]).unwrap_err();
    assert!(e.contains("groups of 16"), "{e}");
    assert_eq!(gguf::ggml_type_name(t), Some("DSVL2_Q8_0_R16"));
}
