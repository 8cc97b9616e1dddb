//! Grounding boxes against the reference's `parse_ref_bbox` (tests/fixtures/grounding.json), and
//! the annotated-image writer.

mod common;

use dsvl2_processor::grounding::BOX2COLOR;
use dsvl2_processor::{
    annotate, load_image, parse_grounding, reference_accepts, save_png, DecodeOptions, GroundedBox, RgbImage,
};
use serde_json::Value;

fn ints(v: &Value) -> Vec<i64> {
    v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect()
}

#[test]
fn fixture_cases() {
    let fixture = common::read_json(&common::fixtures().join("grounding.json"));
    let table = fixture["box2color"].as_object().unwrap();
    assert_eq!(table.len(), BOX2COLOR.len());
    for (i, color) in BOX2COLOR.iter().enumerate() {
        let golden: Vec<u8> = ints(&table[&i.to_string()]).into_iter().map(|v| v as u8).collect();
        assert_eq!(golden, color.to_vec(), "box2color[{i}]");
    }

    let cases = fixture["cases"].as_array().unwrap();
    let (mut accepted, mut refused) = (0, 0);
    for (n, case) in cases.iter().enumerate() {
        let answer = case["answer"].as_str().unwrap();
        let wh = ints(&case["image_size_wh"]);
        let g = parse_grounding(answer, wh[0] as u32, wh[1] as u32);
        let ctx = format!("case {n} {answer:?} {wh:?}: {g:#?}");
        if case["returns_image"].as_bool().unwrap() {
            accepted += 1;
            assert!(reference_accepts(&g), "{ctx}");
            let boxes: Vec<Vec<i64>> = case["boxes"].as_array().unwrap().iter().map(ints).collect();
            let labels: Vec<&str> = case["labels"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| l.as_str().unwrap())
                .collect();
            let colors: Vec<Vec<i64>> = case["colors"].as_array().unwrap().iter().map(ints).collect();
            let label_xy: Vec<Vec<i64>> = case["label_xy"].as_array().unwrap().iter().map(ints).collect();
            assert_eq!(
                g.boxes.iter().map(|b| b.box_px.to_vec()).collect::<Vec<_>>(),
                boxes,
                "{ctx}"
            );
            assert_eq!(
                g.boxes.iter().map(|b| b.label.as_str()).collect::<Vec<_>>(),
                labels,
                "{ctx}"
            );
            let ours: Vec<Vec<i64>> = g.boxes.iter().map(|b| b.color.map(i64::from).to_vec()).collect();
            assert_eq!(ours, colors, "{ctx}");
            assert_eq!(
                g.boxes.iter().map(|b| b.label_xy().to_vec()).collect::<Vec<_>>(),
                label_xy,
                "{ctx}"
            );
            if !g.problems.is_empty() {
                println!("case {n} accepted, notes: {:?}", g.problems);
            }
        } else {
            refused += 1;
            assert!(!reference_accepts(&g), "{ctx}");
            println!(
                "case {n} {answer:?} {wh:?}: refused ({}); problems: {:?}; boxes kept: {:?}",
                g.reference_refusal.as_deref().unwrap(),
                g.problems,
                g.boxes.iter().map(|b| (&b.label, b.box_px)).collect::<Vec<_>>()
            );
            // No answer with grounding tags is refused without an explanation.
            if answer.contains("<|") {
                assert!(!g.problems.is_empty(), "{ctx}");
            }
        }
    }
    println!("{} cases: {accepted} accepted, {refused} refused", cases.len());
    assert_eq!(accepted + refused, cases.len());
}

#[test]
fn forgiving_reading() {
    // Glued dets: the reference cannot eval `[[5,6,7,8]`; we keep both boxes and say why.
    let g = parse_grounding("<|ref|>glued<|/ref|><|det|>[[1,2,3,4]][[5,6,7,8]]<|/det|>", 999, 999);
    assert!(!g.reference_accepts());
    assert_eq!(g.boxes.len(), 2, "{g:#?}");
    assert_eq!(g.boxes[1].box_px, [5, 6, 7, 8]);
    assert!(g.problems.iter().any(|p| p.contains("[[5,6,7,8]")), "{:?}", g.problems);

    // A label across a line break is still read, and the box kept.
    let g = parse_grounding("<|ref|>multi\nline<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>", 999, 999);
    assert!(!g.reference_accepts());
    assert_eq!(g.boxes.len(), 1);
    assert_eq!(g.boxes[0].label, "multi\nline");

    // Bad boxes are dropped one by one; the good ones stay, colours follow the kept boxes.
    let g = parse_grounding(
        "<|ref|>a<|/ref|><|det|>[[1, 2, 3], [10, 10, 5, 20], [x, 1, 2, 3], [0, 0, 999, 999, 7]]<|/det|>\
         <|ref|>b<|/ref|><|det|>[[100, 100, 200, 200]]<|/det|><|ref|>orphan<|/ref|>",
        999,
        999,
    );
    assert!(!g.reference_accepts());
    let kept: Vec<_> = g.boxes.iter().map(|b| (b.label.as_str(), b.box_px, b.color)).collect();
    assert_eq!(
        kept,
        vec![
            ("a", [0, 0, 999, 999], BOX2COLOR[0]),
            ("b", [100, 100, 200, 200], BOX2COLOR[1])
        ]
    );
    for needle in [
        "3 number(s)",
        "inverted",
        "`[x, 1, 2, 3]`",
        "only the first 4",
        "\"orphan\"",
    ] {
        assert!(
            g.problems.iter().any(|p| p.contains(needle)),
            "{needle}: {:#?}",
            g.problems
        );
    }

    // Extra numbers: the reference uses the first four and accepts; we note it.
    let g = parse_grounding("<|ref|>x<|/ref|><|det|>[[1, 2, 3, 4, 5]]<|/det|>", 999, 999);
    assert!(g.reference_accepts());
    assert_eq!(g.boxes[0].box_norm, [1.0, 2.0, 3.0, 4.0]);
    assert_eq!(g.problems.len(), 1);

    // Plain text: no boxes, nothing to complain about, and no image from the reference.
    let g = parse_grounding("Just a sentence.", 640, 480);
    assert!(g.boxes.is_empty() && g.problems.is_empty() && !g.reference_accepts());

    // Python literal forms and float64 arithmetic.
    let g = parse_grounding(
        "<|ref|>f<|/ref|><|det|>[[ -1.5e1, +2_0, 999., 5e2 , ]]<|/det|>",
        1000,
        631,
    );
    assert!(g.reference_accepts(), "{g:#?}");
    assert_eq!(g.boxes[0].box_norm, [-15.0, 20.0, 999.0, 500.0]);
    assert_eq!(g.boxes[0].box_px, [-15, 12, 1000, 315]);
}

fn pixel(img: &RgbImage, x: u32, y: u32) -> [u8; 3] {
    let i = (y as usize * img.width as usize + x as usize) * 3;
    [img.data[i], img.data[i + 1], img.data[i + 2]]
}

fn gbox(label: &str, box_px: [i64; 4], color: [u8; 3]) -> GroundedBox {
    GroundedBox {
        label: label.into(),
        box_px,
        box_norm: [0.0; 4],
        color,
    }
}

/// A grey gradient, so that "unchanged" is checked against varied pixels.
fn canvas(w: u32, h: u32) -> RgbImage {
    let data = (0..h)
        .flat_map(|y| (0..w).flat_map(move |x| [(x % 200) as u8 + 20, (y % 200) as u8 + 20, 30]))
        .collect();
    RgbImage::from_raw(w, h, data).unwrap()
}

#[test]
fn annotate_draws_boxes_and_labels() {
    let base = canvas(320, 240);
    let red = [255, 0, 0];
    let green = [0, 255, 0];
    let boxes = [
        gbox("cat", [40, 60, 200, 180], red),
        gbox("Dog", [220, 100, 300, 230], green),
    ];
    let out = annotate(&base, &boxes);
    assert_eq!((out.width, out.height), (base.width, base.height));

    for (b, color) in [(&boxes[0], red), (&boxes[1], green)] {
        let [x1, y1, x2, y2] = b.box_px.map(|v| v as u32);
        let (xm, ym) = ((x1 + x2) / 2, (y1 + y2) / 2);
        // The 3-pixel outline goes inwards from the (inclusive) edges.
        for d in 0..3 {
            assert_eq!(pixel(&out, xm, y1 + d), color, "top edge of {}", b.label);
            assert_eq!(pixel(&out, xm, y2 - d), color, "bottom edge of {}", b.label);
            assert_eq!(pixel(&out, x1 + d, ym), color, "left edge of {}", b.label);
            assert_eq!(pixel(&out, x2 - d, ym), color, "right edge of {}", b.label);
        }
        // Just inside the outline and just outside the box: untouched.
        for (x, y) in [
            (xm, y1 + 3),
            (x1 + 3, ym),
            (xm, y2 - 3),
            (x2 - 3, ym),
            (x1 - 1, ym),
            (x2 + 1, ym),
            (xm, y2 + 1),
        ] {
            assert_eq!(pixel(&out, x, y), pixel(&base, x, y), "{} at ({x}, {y})", b.label);
        }
        // The label: pixels of the box colour in the 20 rows above the box, from x1 on.
        let [lx, ly] = b.label_xy();
        let label_pixels = (ly.max(0)..(ly + 20).min(y1 as i64))
            .flat_map(|y| (lx..lx + 8 * 16).map(move |x| (x as u32, y as u32)))
            .filter(|&(x, y)| x < out.width && pixel(&out, x, y) == color && pixel(&base, x, y) != color)
            .count();
        assert!(label_pixels > 30, "label {:?}: {label_pixels} pixels", b.label);
    }
    // Far from both boxes and labels: unchanged.
    for (x, y) in [(5, 5), (10, 230), (120, 120), (260, 20), (310, 90)] {
        assert_eq!(pixel(&out, x, y), pixel(&base, x, y), "({x}, {y})");
    }
}

/// Outlines drawn by Pillow 11 (`ImageDraw.rectangle(box, outline=red, width=3)` on black), as
/// the reference draws them: inclusive corners, lines inwards, thin boxes spilling outwards.
#[test]
fn rectangles_match_pillow() {
    let cases: [([i64; 4], &[&str]); 4] = [
        (
            [2, 3, 10, 12],
            &[
                "..............",
                "..............",
                "..............",
                "..#########...",
                "..#########...",
                "..#########...",
                "..###...###...",
                "..###...###...",
                "..###...###...",
                "..###...###...",
                "..#########...",
                "..#########...",
                "..#########...",
                "..............",
                "..............",
            ],
        ),
        (
            [13, 3, 14, 5],
            &[
                "..................",
                "..................",
                "..................",
                ".............##...",
                "............####..",
                "............####..",
                "............####..",
                "..................",
            ],
        ),
        (
            [6, 9, 6, 20],
            &[
                "...........",
                "...........",
                "...........",
                "...........",
                "...........",
                "...........",
                "...........",
                "...........",
                "...........",
                "......#....",
                "......#....",
                "......#....",
                "....#####..",
                "....#####..",
                "....#####..",
                "....#####..",
                "....#####..",
                "....#####..",
                "......#....",
                "......#....",
                "......#....",
                "...........",
            ],
        ),
        (
            [-3, -2, 8, 8],
            &[
                "########", "......##", "......##", "......##", "......##", "......##", "########", "########",
            ],
        ),
    ];
    for (b, golden) in cases {
        let (w, h) = (golden[0].len() as u32, golden.len() as u32);
        let out = annotate(&RgbImage::filled(w, h, [0, 0, 0]), &[gbox("", b, [255, 0, 0])]);
        let ours: Vec<String> = (0..h)
            .map(|y| {
                (0..w)
                    .map(|x| if pixel(&out, x, y)[0] == 255 { '#' } else { '.' })
                    .collect()
            })
            .collect();
        assert_eq!(ours, golden, "{b:?}");
    }
}

#[test]
fn annotate_clips_and_never_panics() {
    let base = canvas(50, 40);
    let blue = [0, 0, 255];
    let boxes = [
        gbox("partly out", [-20, -30, 30, 25], blue),
        gbox("far away", [1000, 1000, 2000, 2000], blue),
        gbox("huge", [i64::MIN, i64::MIN, i64::MAX, i64::MAX], blue),
        gbox("inverted", [40, 30, 10, 5], blue),
        gbox("中文标签 long label that runs off the right edge", [0, 0, 0, 0], blue),
        gbox("", [49, 39, 49, 39], blue),
        gbox("multi\nline", [-5, 50, 60, 60], blue),
    ];
    let out = annotate(&base, &boxes);
    // The partly-outside box: its visible right and bottom edges are drawn.
    assert_eq!(pixel(&out, 30, 10), blue);
    assert_eq!(pixel(&out, 10, 25), blue);
    // Empty inputs too.
    let empty = RgbImage::filled(0, 0, [0, 0, 0]);
    assert_eq!(annotate(&empty, &boxes), empty);
    let g = parse_grounding("<|ref|>beyond<|/ref|><|det|>[[-5, 10, 1200, 1000]]<|/det|>", 50, 40);
    annotate(&base, &g.boxes);
}

#[test]
fn save_png_round_trips() {
    let dir = std::env::temp_dir().join(format!("dsvl2-grounding-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let g = parse_grounding(
        "The <|ref|>dog<|/ref|><|det|>[[0, 0, 499, 499]]<|/det|> chases the <|ref|>red ball<|/ref|><|det|>[[600,650,700,760]]<|/det|>.",
        97,
        61,
    );
    let img = annotate(&canvas(97, 61), &g.boxes);
    let path = dir.join("annotated.png");
    save_png(&img, &path).unwrap();
    let back = load_image(&path, &DecodeOptions::default()).unwrap();
    assert_eq!(back, img);

    // Errors name the file.
    let err = save_png(&img, &dir.join("no/such/dir/x.png")).unwrap_err().to_string();
    assert!(err.contains("x.png"), "{err}");
    let bad = RgbImage {
        width: 3,
        height: 3,
        data: vec![0; 5],
    };
    assert!(save_png(&bad, &path).is_err());
    std::fs::remove_dir_all(&dir).ok();
}

/// Writes an annotated example to `$DSVL2_GROUNDING_PNG` for looking at (skipped without it).
#[test]
fn example_png_for_eyes() {
    let Some(path) = std::env::var_os("DSVL2_GROUNDING_PNG") else {
        return;
    };
    let answer = "<|ref|>The giraffe<|/ref|><|det|>[[120, 145, 600, 990]]<|/det|> and <|ref|>中文 ball Åé<|/ref|>\
                  <|det|>[[650, 100, 950, 400], [700, 500, 990, 700]]<|/det|>";
    let g = parse_grounding(answer, 400, 300);
    save_png(&annotate(&canvas(400, 300), &g.boxes), std::path::Path::new(&path)).unwrap();
}
