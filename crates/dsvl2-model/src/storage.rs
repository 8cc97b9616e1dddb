//! Which storage format each checkpoint tensor gets for a requested `--dtype`. One rule, used both
//! when loading (quantizing at load time) and by `dsvl2 quantize` (writing a GGUF), so a GGUF
//! holds exactly what the loader would have made.

use dsvl2_kernels::Format;

/// Float tensors with at least this many elements (the token embedding) are stored as bf16 when a
/// compact format is requested: the official checkpoints are bf16, so this halves a GGUF's copy
/// losslessly (f16 would round the smallest values: a q8_0 GGUF with an f16 embedding drifted from
/// the same weights loaded from the folder after 61 greedy tokens). Smaller ones (norms, biases,
/// position embeddings) stay f32.
const LARGE_FLOAT_TENSOR: usize = 1 << 20;

/// Linear-layer weights `[out, in]`: every 2-D `*.weight` except the token embedding (a lookup
/// table) and the MoE routers (`mlp.gate`), which stay f32 so routing matches the reference.
pub fn is_linear_weight(name: &str, shape: &[usize]) -> bool {
    shape.len() == 2
        && name.ends_with(".weight")
        && !name.ends_with("embed_tokens.weight")
        && !name.ends_with(".mlp.gate.weight")
}

/// The format a linear weight with `cols` inputs gets: the requested one if its blocks divide the
/// rows, else the next best that does (q4_k needs multiples of 256, q8_0 of 32; e.g. SigLIP's
/// fc2 has 4304 inputs and the MoE down projections 896 or 1408).
pub fn linear_format(requested: Format, cols: usize) -> Format {
    [requested, Format::Q8_0, Format::F16]
        .into_iter()
        .find(|f| f.supports_cols(cols))
        .expect("f16 supports every width")
}

/// The format tensor `name` of `shape` is stored in when `requested` is asked for. q8_0 weights get
/// the 16-row interleaved layout where their rows allow (every DeepSeek-VL2 size's do): its integer
/// kernels do a fraction of the plain layout's work per weight when decoding, and outrun
/// dequantized panels + f32 sgemm on prompts and the vision tower's tiles too (see the
/// dsvl2-kernels README; with AVX2 alone, OpenBLAS takes the vision tower's products back). Tiny, 5 tiles, vision tower and projector plain → interleaved: 11.2-11.8 s
/// → 9.1-9.4 s (0.59-0.61 → 0.72-0.77 of the f32 FMA peak; two interleaved runs, Emerald Rapids
/// 2 vCPU). Their activations are then rounded to 8 bits per 32 values, as the language model's are.
///
/// The interleaved layout also takes widths that are not whole q8_0 blocks (its rows end in a
/// zero-padded block): SigLIP's fc2 (4304 inputs, a third of the tower's linear work) stayed f16 and
/// ran through f32 sgemm before (~30% of the tower's CPU time with the other linears on AMX, perf).
pub fn storage_format(name: &str, shape: &[usize], requested: Format) -> Format {
    if is_linear_weight(name, shape) {
        let format = linear_format(requested, shape[1]);
        // q8_0, also where only the width kept it from plain q8_0 (f16 is then the fallback).
        let eight_bit =
            format == Format::Q8_0 || (format == Format::F16 && matches!(requested, Format::Q8_0 | Format::Q4K));
        if eight_bit && Format::Q8_0R16.supports_rows(shape[0]) {
            return Format::Q8_0R16;
        }
        return format;
    }
    let elements: usize = shape.iter().product();
    if requested != Format::F32 && elements >= LARGE_FLOAT_TENSOR {
        Format::Bf16
    } else {
        Format::F32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_weights_fall_back_to_a_format_their_width_allows() {
        let name = "language.model.layers.1.mlp.experts.0.down_proj.weight";
        assert_eq!(storage_format(name, &[1280, 896], Format::Q4K), Format::Q8_0R16);
        assert_eq!(storage_format(name, &[1288, 896], Format::Q4K), Format::Q8_0);
        assert_eq!(storage_format(name, &[1280, 1024], Format::Q4K), Format::Q4K);
        assert_eq!(
            storage_format("vision.blocks.0.mlp.fc2.weight", &[1152, 4304], Format::Q8_0),
            Format::Q8_0R16
        );
        assert_eq!(
            storage_format("vision.blocks.0.mlp.fc2.weight", &[1150, 4304], Format::Q8_0),
            Format::F16
        );
        assert_eq!(storage_format(name, &[1280, 896], Format::Bf16), Format::Bf16);
    }

    #[test]
    fn q8_0_weights_are_interleaved_where_their_rows_allow() {
        let expert = "language.model.layers.1.mlp.experts.0.up_proj.weight";
        assert_eq!(storage_format(expert, &[896, 1280], Format::Q8_0), Format::Q8_0R16);
        assert_eq!(storage_format(expert, &[900, 1280], Format::Q8_0), Format::Q8_0);
        assert_eq!(
            storage_format("language.lm_head.weight", &[129280, 1280], Format::Q8_0),
            Format::Q8_0R16
        );
        let vision = "vision.blocks.0.attn.qkv.weight";
        assert_eq!(storage_format(vision, &[3456, 1152], Format::Q8_0), Format::Q8_0R16);
        assert_eq!(
            storage_format("projector.layers.0.weight", &[1280, 4608], Format::Q8_0),
            Format::Q8_0R16
        );
        assert_eq!(
            storage_format("projector.layers.0.weight", &[1288, 4608], Format::Q8_0),
            Format::Q8_0
        );
    }

    #[test]
    fn routers_norms_and_embeddings_stay_float() {
        let router = "language.model.layers.1.mlp.gate.weight";
        assert_eq!(storage_format(router, &[64, 1280], Format::Q4K), Format::F32);
        let norm = "language.model.norm.weight";
        assert_eq!(storage_format(norm, &[1280], Format::Q4K), Format::F32);
        let embed = "language.model.embed_tokens.weight";
        assert_eq!(storage_format(embed, &[129280, 1280], Format::Q4K), Format::Bf16);
        assert_eq!(storage_format(embed, &[129280, 1280], Format::F32), Format::F32);
    }
}
