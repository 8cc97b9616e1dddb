//! Grounding answers as data: `<|ref|>label<|/ref|><|det|>[[x1, y1, x2, y2], ...]<|/det|>` with
//! coordinates 0-999 relative to the image, turned into pixel boxes the way the reference's
//! `parse_ref_bbox` (deepseek_vl2/serve/app_modules/utils.py) computes them.
//!
//! The reference is all-or-nothing: any flaw and it returns no image. [`parse_grounding`] instead
//! keeps every well-formed box and lists each flaw in [`Grounding::problems`]; separately,
//! [`Grounding::reference_refusal`] says whether (and why) the reference would have refused. When
//! the reference accepts, [`Grounding::boxes`] are exactly the boxes it draws, in its order, with
//! its colours; the forgiving readings (tags across line breaks, unbalanced brackets, unpaired
//! tags) only ever apply to answers the reference refuses.
//!
//! The reference's rules, reproduced here: `re.findall` of `<\|ref\|>.*?<\|/ref\|>` and of
//! `<\|det\|>.*?<\|/det\|>` (`.` does not match a newline), paired in order; the det text without
//! its tags loses its first and last character, then every `\[.*?\]` in it is `eval`'d as one box
//! with the pair's label; pixel = `int(v / 999 * W)` for x and `int(v / 999 * H)` for y (float64,
//! truncation toward zero, no clamping).

const REF_OPEN: &str = "<|ref|>";
const REF_CLOSE: &str = "<|/ref|>";
const DET_OPEN: &str = "<|det|>";
const DET_CLOSE: &str = "<|/det|>";

/// The box colours by drawing index (`i % 13`): the reference's `BOX2COLOR` table in
/// deepseek_vl2/serve/app_modules/utils.py, as recorded in `tests/fixtures/grounding.json`
/// (`box2color`).
pub const BOX2COLOR: [[u8; 3]; 13] = [
    [255, 0, 0],
    [0, 255, 0],
    [0, 0, 255],
    [0, 255, 255],
    [255, 255, 0],
    [255, 0, 255],
    [127, 127, 127],
    [255, 255, 127],
    [255, 127, 255],
    [127, 255, 255],
    [127, 127, 255],
    [127, 255, 127],
    [255, 127, 127],
];

/// The reference writes a box's label at `[x1, y1 - LABEL_OFFSET_Y]`.
pub const LABEL_OFFSET_Y: i64 = 20;

/// One box of a grounding answer.
#[derive(Debug, Clone, PartialEq)]
pub struct GroundedBox {
    /// The text between `<|ref|>` and `<|/ref|>` (empty for a det that has no ref).
    pub label: String,
    /// `[x1, y1, x2, y2]` in pixels: `int(v / 999 * W)` / `int(v / 999 * H)`, not clamped (may be
    /// negative or beyond the image; 999 maps to the width/height itself).
    pub box_px: [i64; 4],
    /// The four numbers as written (0-999 scale).
    pub box_norm: [f64; 4],
    /// `BOX2COLOR[i % 13]`, `i` the box's index in drawing order.
    pub color: [u8; 3],
}

impl GroundedBox {
    /// Where the reference writes the label: `[x1, y1 - 20]` (top-left of the text).
    pub fn label_xy(&self) -> [i64; 2] {
        [self.box_px[0], self.box_px[1].saturating_sub(LABEL_OFFSET_Y)]
    }
}

/// The boxes of an answer, and what was wrong with it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Grounding {
    /// Every well-formed box, in drawing order.
    pub boxes: Vec<GroundedBox>,
    /// Each flaw found, naming what and where (byte offsets into the answer). Some are only notes
    /// (e.g. numbers after the fourth, which the reference ignores too); see `reference_refusal`
    /// for whether the reference would draw anything.
    pub problems: Vec<String>,
    /// Why the reference `parse_ref_bbox` returns None for this answer; `None` when it returns an
    /// image, in which case `boxes` are exactly the boxes it draws.
    pub reference_refusal: Option<String>,
}

impl Grounding {
    /// Whether the reference would have returned an image (`returns_image` in the fixtures).
    pub fn reference_accepts(&self) -> bool {
        self.reference_refusal.is_none()
    }
}

/// Whether the reference `parse_ref_bbox` would have returned an image for this answer.
pub fn reference_accepts(grounding: &Grounding) -> bool {
    grounding.reference_accepts()
}

/// A `<|tag|>...<|/tag|>` occurrence: its byte range in the answer.
#[derive(Debug, Clone, Copy)]
struct Span {
    start: usize,
    end: usize,
}

/// `re.findall(re.escape(open) + ".*?" + re.escape(close), text)` without DOTALL: byte ranges.
fn findall_lazy(text: &str, open: &str, close: &str) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(p) = text[from..].find(open).map(|p| p + from) {
        let body = p + open.len();
        match text[body..].find(close) {
            Some(q) if !text[body..body + q].contains('\n') => {
                let end = body + q + close.len();
                out.push((p, end));
                from = end;
            }
            // No match can start here; the regex engine moves on by one character.
            _ => from = p + text[p..].chars().next().map_or(1, char::len_utf8),
        }
    }
    out
}

/// Byte offsets of every occurrence of `needle`.
fn occurrences(text: &str, needle: &str) -> Vec<usize> {
    text.match_indices(needle).map(|(i, _)| i).collect()
}

/// Tags of one kind (`ref` or `det`) the reference leaves unmatched: reported, and in the
/// forgiving reading a stray opening tag closed only after a line break is used anyway.
fn stray_tags(
    answer: &str,
    spans: &[Span],
    open: &str,
    close: &str,
    recover: bool,
    problems: &mut Vec<String>,
) -> Vec<Span> {
    let inside = |pos: usize| spans.iter().any(|s| s.start <= pos && pos < s.end);
    let mut recovered = Vec::new();
    for p in occurrences(answer, open).into_iter().filter(|&p| !inside(p)) {
        let body = p + open.len();
        match answer[body..].find(close) {
            None => problems.push(format!("`{open}` at byte {p} is never closed by `{close}`")),
            Some(q) if answer[body..body + q].contains(open) => problems.push(format!(
                "`{open}` at byte {p} is followed by another `{open}` on a later line before any `{close}`"
            )),
            Some(q) => {
                let end = body + q + close.len();
                let used = if recover {
                    "; read anyway"
                } else {
                    "; ignored, as the reference does"
                };
                problems.push(format!(
                    "`{open}` at byte {p} is closed only after a line break (byte {}); the reference matches \
                     tags within one line{used}",
                    body + q
                ));
                if recover {
                    recovered.push(Span { start: p, end });
                }
            }
        }
    }
    let all: Vec<Span> = spans.iter().chain(&recovered).copied().collect();
    for p in occurrences(answer, close) {
        if !all.iter().any(|s| s.start <= p && p < s.end) {
            problems.push(format!("`{close}` at byte {p} has no `{open}` before it"));
        }
    }
    recovered
}

/// The label of a ref match: `label.replace('<|ref|>', '').replace('<|/ref|>', '')`.
fn label_of(answer: &str, span: Span) -> String {
    answer[span.start..span.end]
        .replace(REF_OPEN, "")
        .replace(REF_CLOSE, "")
}

/// The box texts of a det match: tags removed, first and last character dropped (Python's
/// `[1:-1]`, by characters), then every `\[.*?\]`.
fn box_texts(answer: &str, span: Span) -> Vec<String> {
    let text = answer[span.start..span.end]
        .replace(DET_OPEN, "")
        .replace(DET_CLOSE, "");
    let n = text.chars().count();
    let inner: String = if n >= 2 {
        text.chars().skip(1).take(n - 2).collect()
    } else {
        String::new()
    };
    findall_lazy(&inner, "[", "]")
        .into_iter()
        .map(|(a, b)| inner[a..b].to_string())
        .collect()
}

/// Parses a grounding answer for an image of `width` x `height` pixels. Never fails: flaws are
/// listed in `problems`, and `reference_refusal` says whether the reference would draw the boxes.
pub fn parse_grounding(answer: &str, width: u32, height: u32) -> Grounding {
    let mut problems = Vec::new();
    let to_spans =
        |v: Vec<(usize, usize)>| -> Vec<Span> { v.into_iter().map(|(start, end)| Span { start, end }).collect() };
    let refs = to_spans(findall_lazy(answer, REF_OPEN, REF_CLOSE));
    let dets = to_spans(findall_lazy(answer, DET_OPEN, DET_CLOSE));

    // The reference's pairing: zip in order, refused when the counts differ or are zero.
    let pairing_refusal = if refs.len() != dets.len() {
        Some(format!(
            "{} `<|ref|>…<|/ref|>` match(es) but {} `<|det|>…<|/det|>` match(es) (the reference pairs them in order \
             and asserts equal counts)",
            refs.len(),
            dets.len()
        ))
    } else if refs.is_empty() {
        Some("no `<|ref|>…<|/ref|>` on one line in the answer".to_string())
    } else {
        None
    };

    // (label, det) pairs in drawing order.
    let mut pairs: Vec<(String, Span)> = Vec::new();
    if pairing_refusal.is_none() {
        stray_tags(answer, &refs, REF_OPEN, REF_CLOSE, false, &mut problems);
        stray_tags(answer, &dets, DET_OPEN, DET_CLOSE, false, &mut problems);
        for (r, d) in refs.iter().zip(&dets) {
            if d.start < r.start {
                problems.push(format!(
                    "det at byte {} comes before its ref {:?} at byte {} (paired by order, like the reference)",
                    d.start,
                    label_of(answer, *r),
                    r.start
                ));
            }
            pairs.push((label_of(answer, *r), *d));
        }
    } else {
        // Forgiving reading: also take tags split across lines, then pair each det with the
        // nearest unpaired ref before it.
        let mut all_refs = refs.clone();
        all_refs.extend(stray_tags(answer, &refs, REF_OPEN, REF_CLOSE, true, &mut problems));
        let mut all_dets = dets.clone();
        all_dets.extend(stray_tags(answer, &dets, DET_OPEN, DET_CLOSE, true, &mut problems));
        let mut tags: Vec<(bool, Span)> = all_refs
            .iter()
            .map(|s| (true, *s))
            .chain(all_dets.iter().map(|s| (false, *s)))
            .collect();
        tags.sort_by_key(|(_, s)| s.start);
        let mut pending: Option<Span> = None;
        for (is_ref, span) in tags {
            if is_ref {
                if let Some(prev) = pending.replace(span) {
                    problems.push(format!(
                        "ref {:?} at byte {} has no det",
                        label_of(answer, prev),
                        prev.start
                    ));
                }
            } else if let Some(r) = pending.take() {
                pairs.push((label_of(answer, r), span));
            } else {
                problems.push(format!(
                    "det at byte {} has no ref before it; its boxes get an empty label",
                    span.start
                ));
                pairs.push((String::new(), span));
            }
        }
        if let Some(prev) = pending {
            problems.push(format!(
                "ref {:?} at byte {} has no det",
                label_of(answer, prev),
                prev.start
            ));
        }
    }

    let (w, h) = (width as f64, height as f64);
    let mut eval_refusal: Option<String> = None;
    let mut draw_refusal: Option<String> = None;
    let mut boxes = Vec::new();
    for (label, det) in &pairs {
        let texts = box_texts(answer, *det);
        let det_text = &answer[det.start..det.end];
        if texts.is_empty() {
            let hint = if det_text.chars().any(|c| c.is_ascii_digit()) {
                " (written without the outer brackets? the reference drops the det's first and last character, \
                 then reads each `[...]`)"
            } else {
                ""
            };
            problems.push(format!(
                "det at byte {} (label {label:?}) holds no box{hint}; nothing is drawn for it",
                det.start
            ));
        }
        for (k, text) in texts.iter().enumerate() {
            let at = format!("box {k} `{text}` of det at byte {} (label {label:?})", det.start);
            let values = match eval_number_list(text) {
                Ok(v) => v,
                Err(why) => {
                    eval_refusal.get_or_insert_with(|| format!("{at}: Python cannot eval it ({why})"));
                    match lenient_number_list(text) {
                        Some(v) => {
                            problems.push(format!("{at}: not a Python list of numbers ({why}); read as {v:?}"));
                            v
                        }
                        None => {
                            problems.push(format!("{at}: not a list of numbers ({why}); skipped"));
                            continue;
                        }
                    }
                }
            };
            if values.len() < 4 {
                let why = format!("{at}: {} number(s), a box needs 4", values.len());
                draw_refusal.get_or_insert_with(|| why.clone());
                problems.push(format!("{why}; skipped"));
                continue;
            }
            if values.len() > 4 {
                problems.push(format!(
                    "{at}: {} numbers; only the first 4 are used (as in the reference)",
                    values.len()
                ));
            }
            let norm = [values[0], values[1], values[2], values[3]];
            if norm.iter().any(|v| v.is_nan()) {
                let why = format!("{at}: a complex number among the first 4 (Python's int() refuses it)");
                draw_refusal.get_or_insert_with(|| why.clone());
                problems.push(format!("{why}; skipped"));
                continue;
            }
            // int(v / 999 * W): float64, truncation toward zero.
            let px_f = [
                (norm[0] / 999.0 * w).trunc(),
                (norm[1] / 999.0 * h).trunc(),
                (norm[2] / 999.0 * w).trunc(),
                (norm[3] / 999.0 * h).trunc(),
            ];
            // 2^63 (`i64::MAX as f64`): beyond i64; Pillow fails on such coordinates too.
            if px_f.iter().any(|v| !v.is_finite() || v.abs() >= i64::MAX as f64) {
                let why = format!("{at}: pixel coordinates {px_f:?} are out of range");
                draw_refusal.get_or_insert_with(|| why.clone());
                problems.push(format!("{why}; skipped"));
                continue;
            }
            if px_f[2] < px_f[0] || px_f[3] < px_f[1] {
                let why = format!(
                    "{at}: inverted box in pixels {:?} (x2 < x1 or y2 < y1; Pillow refuses to draw it)",
                    px_f.map(|v| v as i64)
                );
                draw_refusal.get_or_insert_with(|| why.clone());
                problems.push(format!("{why}; skipped"));
                continue;
            }
            let color = BOX2COLOR[boxes.len() % BOX2COLOR.len()];
            boxes.push(GroundedBox {
                label: label.clone(),
                box_px: px_f.map(|v| v as i64),
                box_norm: norm,
                color,
            });
        }
    }

    Grounding {
        boxes,
        problems,
        reference_refusal: pairing_refusal.or(eval_refusal).or(draw_refusal),
    }
}

/// `eval(text)` for the realistic box texts: a Python list literal of int/float literals with
/// optional unary signs, spaces and a trailing comma (Python's int forms `1_000`, `0x1f`, `0o17`,
/// `0b101`, and `True`/`False` included; an imaginary literal such as `3j` reads as NaN, so that a
/// box using it is refused while numbers after the fourth stay irrelevant, as in Python). Anything
/// else is an error (Python would accept a few more exotic forms, e.g. `(1)` or `2*3`, which a
/// model does not write).
pub fn eval_number_list(text: &str) -> Result<Vec<f64>, String> {
    let b = text.as_bytes();
    let mut i = 0;
    let ws = |i: &mut usize| {
        while *i < b.len() && matches!(b[*i], b' ' | b'\t' | b'\x0c' | b'\r') {
            *i += 1;
        }
    };
    ws(&mut i);
    if b.get(i) != Some(&b'[') {
        return Err("does not start with `[`".into());
    }
    i += 1;
    let mut values = Vec::new();
    loop {
        ws(&mut i);
        match b.get(i) {
            None => return Err("no closing `]`".into()),
            Some(b']') => {
                i += 1;
                break;
            }
            _ => {}
        }
        // Unary signs, possibly separated by spaces: `- 5`, `+-5`.
        let mut negative = false;
        while let Some(&c @ (b'+' | b'-')) = b.get(i) {
            negative ^= c == b'-';
            i += 1;
            ws(&mut i);
        }
        let (value, len) = python_number(&text[i..]).map_err(|e| format!("at character {i}: {e}"))?;
        values.push(if negative { -value } else { value });
        i += len;
        ws(&mut i);
        match b.get(i) {
            Some(b',') => i += 1,
            Some(b']') => {
                i += 1;
                break;
            }
            Some(_) => return Err(format!("unexpected {:?} at character {i}", &text[i..])),
            None => return Err("no closing `]`".into()),
        }
    }
    ws(&mut i);
    if i != b.len() {
        return Err(format!("trailing text {:?}", &text[i..]));
    }
    Ok(values)
}

/// A Python decimal int or float literal at the start of `s`: its value and byte length.
fn python_number(s: &str) -> Result<(f64, usize), String> {
    let b = s.as_bytes();
    // `True` and `False` are the ints 1 and 0 in Python arithmetic.
    for (name, value) in [("True", 1.0), ("False", 0.0)] {
        if s.starts_with(name)
            && !b
                .get(name.len())
                .is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_')
        {
            return Ok((value, name.len()));
        }
    }
    // 0x / 0o / 0b integers (underscores allowed, also right after the prefix).
    if b.first() == Some(&b'0') {
        if let Some(radix) = b.get(1).and_then(|c| match c.to_ascii_lowercase() {
            b'x' => Some(16),
            b'o' => Some(8),
            b'b' => Some(2),
            _ => None,
        }) {
            let (mut value, mut digits, mut i) = (0.0f64, 0, 2);
            while let Some(&c) = b.get(i) {
                if let Some(d) = (c as char).to_digit(radix) {
                    value = value * radix as f64 + d as f64;
                    digits += 1;
                } else if !(c == b'_' && b.get(i + 1).is_some_and(|n| (*n as char).is_digit(radix))) {
                    break;
                }
                i += 1;
            }
            if digits == 0
                || b.get(i)
                    .is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_' || *c == b'.')
            {
                return Err(format!("invalid number literal {:?}", &s[..(i + 1).min(s.len())]));
            }
            return Ok((value, i));
        }
    }
    let mut i = 0;
    // digitpart: digit (["_"] digit)*
    let digitpart = |i: &mut usize| -> Result<usize, String> {
        let start = *i;
        while *i < b.len() {
            let digit = b[*i].is_ascii_digit();
            let separator = b[*i] == b'_' && *i > start && b.get(*i + 1).is_some_and(u8::is_ascii_digit);
            if !(digit || separator) {
                break;
            }
            *i += 1;
        }
        if b.get(*i) == Some(&b'_') {
            return Err("misplaced `_` in a number".into());
        }
        Ok(*i - start)
    };
    let int_len = digitpart(&mut i)?;
    let mut is_float = false;
    let mut frac_len = 0;
    if b.get(i) == Some(&b'.') {
        i += 1;
        is_float = true;
        frac_len = digitpart(&mut i)?;
    }
    if int_len == 0 && frac_len == 0 {
        return Err(format!(
            "expected a number, found {:?}",
            s.chars().take(12).collect::<String>()
        ));
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        let mut j = i + 1;
        if matches!(b.get(j), Some(b'+' | b'-')) {
            j += 1;
        }
        if b.get(j).is_some_and(u8::is_ascii_digit) {
            i = j;
            digitpart(&mut i)?;
            is_float = true;
        }
    }
    if matches!(b.get(i), Some(b'j' | b'J')) && !b.get(i + 1).is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_') {
        // An imaginary literal: Python builds the list, and fails only where the box uses it.
        return Ok((f64::NAN, i + 1));
    }
    if b.get(i)
        .is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_' || *c == b'.')
    {
        return Err(format!(
            "unsupported number literal {:?}",
            s[..i + 1].chars().collect::<String>()
        ));
    }
    let literal: String = s[..i].chars().filter(|&c| c != '_').collect();
    if !is_float && literal.len() > 1 && literal.starts_with('0') && literal.bytes().any(|c| c != b'0') {
        return Err(format!(
            "leading zeros in the integer {literal} (a Python syntax error)"
        ));
    }
    let value: f64 = literal.parse().map_err(|e| format!("bad number {literal:?}: {e}"))?;
    Ok((value, i))
}

/// The forgiving reading of a box Python cannot eval: stray brackets removed, comma-separated
/// numbers (leading zeros allowed). `None` when anything else is in it.
fn lenient_number_list(text: &str) -> Option<Vec<f64>> {
    let body = text
        .trim()
        .trim_start_matches(|c: char| c == '[' || c.is_whitespace())
        .trim_end_matches(|c: char| c == ']' || c.is_whitespace());
    let mut parts: Vec<&str> = body.split(',').map(str::trim).collect();
    if parts.last() == Some(&"") {
        parts.pop();
    }
    parts
        .into_iter()
        .map(|p| {
            let (negative, digits) = match p.strip_prefix('-') {
                Some(rest) => (true, rest.trim_start()),
                None => (false, p.strip_prefix('+').unwrap_or(p).trim_start()),
            };
            if digits.is_empty() || !digits.bytes().all(|c| c.is_ascii_digit() || c == b'.') {
                return None;
            }
            digits.parse::<f64>().ok().map(|v| if negative { -v } else { v })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_literals() {
        assert_eq!(eval_number_list("[1, 2, 3, 4]"), Ok(vec![1.0, 2.0, 3.0, 4.0]));
        assert_eq!(
            eval_number_list("[ -5 ,+1.5, 1., .5, 1e2, 1_0, - 3, 00,]"),
            Ok(vec![-5.0, 1.5, 1.0, 0.5, 100.0, 10.0, -3.0, 0.0])
        );
        assert_eq!(
            eval_number_list("[0x1F, 0o17, 0B1_01, 0x_a]"),
            Ok(vec![31.0, 15.0, 5.0, 10.0])
        );
        assert_eq!(eval_number_list("[True, -False, 1, 2]"), Ok(vec![1.0, 0.0, 1.0, 2.0]));
        assert!(eval_number_list("[1, 2, 3, 4, 5j]").unwrap()[4].is_nan());
        assert_eq!(eval_number_list("[]"), Ok(vec![]));
        for bad in [
            "[[5,6,7,8]",
            "[1,,2]",
            "[,]",
            "[01, 2]",
            "[1 2]",
            "[0x]",
            "[0x1g]",
            "[0b2]",
            "[1jx]",
            "[a]",
            "[Truex]",
            "[None]",
            "[1_]",
            "[1.2.3]",
            "[-]",
        ] {
            assert!(eval_number_list(bad).is_err(), "{bad}");
        }
        assert_eq!(lenient_number_list("[[5,6,7,8]"), Some(vec![5.0, 6.0, 7.0, 8.0]));
        assert_eq!(lenient_number_list("[01, -2, 3.5,]"), Some(vec![1.0, -2.0, 3.5]));
        assert_eq!(lenient_number_list("[a, 2]"), None);
    }
}
