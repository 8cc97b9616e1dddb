//! `dsvl2 chat`: an interactive multi-turn session. The KV cache is kept between turns: each new
//! prompt is the whole conversation (as the reference would build it), and only the tokens after
//! the longest prefix the cache already holds are prefilled.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

use anyhow::Context;
use dsvl2_model::GgufWeights;
use dsvl2_processor::{Conversation, Message};

use super::generate::SamplingArgs;
use crate::runner::{answer, is_broken_pipe, load_model, open_model, LoadArgs, LoadedModel};

#[derive(clap::Args, Debug)]
pub struct ChatArgs {
    /// Model folder or Hub repo id, as for `generate`.
    #[arg(long, value_name = "DIR|REPO", default_value = crate::runner::DEFAULT_MODEL)]
    pub model: String,

    /// System prompt (like the reference, shown in the template but not tokenized). Default: empty.
    #[arg(long, value_name = "TEXT", default_value = "", hide_default_value = true)]
    pub system: String,

    #[command(flatten)]
    pub sampling: SamplingArgs,

    #[command(flatten)]
    pub load: LoadArgs,
}

const HELP: &str = "Type a message and press Enter. Commands: /image PATH (attach an image to your next \
message), /reset (start over), /exit (or end of input).";

/// The conversation so far and what the cache holds.
struct Session {
    messages: Vec<Message>,
    /// Images attached for the next user message.
    pending_images: Vec<PathBuf>,
    /// The token ids whose keys and values are in `cache`, in order.
    cached_ids: Vec<u32>,
    cache: dsvl2_model::SequenceCache,
}

impl Session {
    fn new(loaded: &LoadedModel) -> Self {
        Session {
            messages: Vec::new(),
            pending_images: Vec::new(),
            cached_ids: Vec::new(),
            cache: loaded.model.new_cache(),
        }
    }
}

pub fn run(args: ChatArgs) -> anyhow::Result<()> {
    let sampling = args.sampling.params()?;
    let limits = args.sampling.limits();
    let loaded = load_model(open_model(&args.model)?, &args.load.options(GgufWeights::InMemory))?;
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!("{HELP}");
    }
    let mut session = Session::new(&loaded);
    let mut stdout = std::io::stdout().lock();
    let mut lines = std::io::stdin().lock().lines();
    loop {
        if interactive {
            eprint!("> ");
        }
        let Some(line) = lines.next() else { break };
        let line = line.context("cannot read standard input")?;
        let line = line.trim();
        match line.split_once(' ').map_or((line, ""), |(c, rest)| (c, rest.trim())) {
            ("", _) => continue,
            ("/exit", _) | ("/quit", _) => break,
            ("/reset", _) => {
                session = Session::new(&loaded);
                eprintln!("(conversation cleared)");
                continue;
            }
            ("/image", path) if !path.is_empty() => {
                // Fail now, not at the next message, if the image cannot be used.
                match loaded.processor.load_image(path.as_ref()) {
                    Ok(_) => session.pending_images.push(PathBuf::from(path)),
                    Err(e) => eprintln!("error: {e}"),
                }
                continue;
            }
            ("/image", _) => {
                eprintln!("usage: /image PATH");
                continue;
            }
            (command, _) if command.starts_with('/') && !command.contains('<') => {
                eprintln!("unknown command {command}. {HELP}");
                continue;
            }
            _ => {}
        }
        let images = std::mem::take(&mut session.pending_images);
        match turn(
            &loaded,
            &mut session,
            &args.system,
            line,
            images,
            &sampling,
            &limits,
            &mut stdout,
        ) {
            Ok(()) => {}
            Err(e) if is_broken_pipe(&e) => return Err(e),
            // A bad turn (too long, unreadable image) is reported; the session goes on.
            Err(e) => eprintln!("error: {e:#}"),
        }
    }
    Ok(())
}

/// One user message and the streamed answer.
#[allow(clippy::too_many_arguments)]
fn turn(
    loaded: &LoadedModel,
    session: &mut Session,
    system: &str,
    text: &str,
    images: Vec<PathBuf>,
    sampling: &dsvl2_model::SamplingParams,
    limits: &crate::runner::Limits,
    stdout: &mut impl Write,
) -> anyhow::Result<()> {
    let mut conversation = Conversation {
        messages: session.messages.clone(),
    };
    conversation.messages.push(Message::user(text, images));
    conversation.messages.push(Message::assistant(""));
    for note in conversation.insert_missing_image_tags(&loaded.processor.config().image_token) {
        eprintln!("note: {note}");
    }
    let prepared = loaded.processor.prepare_with_files(&conversation, system)?;
    // Keep the cached tokens the new prompt starts with; prefill the rest.
    let common = session
        .cached_ids
        .iter()
        .zip(&prepared.input_ids)
        .take_while(|(a, b)| a == b)
        .count();
    session.cache.truncate(common);
    session.cached_ids.truncate(common);
    let reply = answer(loaded, &prepared, &mut session.cache, sampling, limits, |piece| {
        stdout.write_all(piece.as_bytes())?;
        stdout.flush()
    })?;
    writeln!(stdout)?;
    // The cache now holds the prompt and every generated token but the last.
    session.cached_ids = prepared.input_ids.clone();
    session
        .cached_ids
        .extend(&reply.tokens[..reply.tokens.len().saturating_sub(1)]);
    conversation.messages.pop();
    conversation.messages.push(Message::assistant(reply.text));
    session.messages = conversation.messages;
    Ok(())
}
