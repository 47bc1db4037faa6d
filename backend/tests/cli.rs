//! The command line as users see it: the man page `baton.1` and the clap definition must
//! list the same options (so neither can drift), `--help` must show them all, usage
//! errors must exit with status 2, and `--print-capabilities` must print the vhost-user
//! JSON.
//!
//! Most tests drive the clap `Command` through the library; the `binary_*` ones run the
//! `baton` binary itself.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command as Process;

use baton::cli::{try_parse_args_from, Cli, CAPABILITIES_JSON, DEFAULT_LINGER_SECS};
use baton::config::DEFAULT_MTU;
use clap::CommandFactory;

const MAN_PAGE: &str = include_str!("../baton.1");

/// Long option name → its short letter, if any.
type OptionTable = BTreeMap<String, Option<char>>;

/// The options of every `.TP` tag line in the OPTIONS section of the man page: bold
/// words (`\fB…\fR`) that start with `-`. Spellings on one line share the short letter.
fn man_page_options() -> OptionTable {
    let mut table = OptionTable::new();
    let mut in_options = false;
    let mut previous_was_tp = false;
    for line in MAN_PAGE.lines() {
        if let Some(section) = line.strip_prefix(".SH ") {
            in_options = section.trim() == "OPTIONS";
        }
        let is_tag_line = in_options && previous_was_tp;
        previous_was_tp = line.trim() == ".TP";
        if !is_tag_line {
            continue;
        }
        let mut longs = Vec::new();
        let mut short = None;
        for bold in line.split("\\fB").skip(1) {
            let word = bold
                .split("\\f")
                .next()
                .unwrap_or_default()
                .replace("\\-", "-");
            if let Some(long) = word.strip_prefix("--") {
                longs.push(long.to_owned());
            } else if let Some(letter) = word.strip_prefix('-') {
                let mut chars = letter.chars();
                if let (Some(c), None) = (chars.next(), chars.next()) {
                    short = Some(c);
                }
            }
        }
        assert!(
            !longs.is_empty(),
            "man page tag line without a long option: {line}"
        );
        for long in longs {
            assert!(
                table.insert(long.clone(), short).is_none(),
                "--{long} documented twice"
            );
        }
    }
    table
}

/// Every long name and visible alias clap accepts, with the argument's short letter.
fn clap_options() -> OptionTable {
    let mut command = Cli::command();
    command.build();
    let mut table = OptionTable::new();
    for arg in command.get_arguments() {
        let Some(long) = arg.get_long() else {
            panic!("argument {} has no long name", arg.get_id());
        };
        let aliases = arg.get_visible_aliases().unwrap_or_default();
        for name in std::iter::once(long).chain(aliases) {
            table.insert(name.to_owned(), arg.get_short());
        }
    }
    table
}

#[test]
fn man_page_documents_exactly_the_options_clap_knows() {
    let documented: BTreeSet<String> = man_page_options().into_keys().collect();
    let known: BTreeSet<String> = clap_options().into_keys().collect();
    let undocumented: Vec<_> = known.difference(&documented).collect();
    let unknown: Vec<_> = documented.difference(&known).collect();
    assert!(
        undocumented.is_empty(),
        "missing from baton.1: {undocumented:?}"
    );
    assert!(
        unknown.is_empty(),
        "in baton.1 but not accepted: {unknown:?}"
    );
    assert!(
        known.len() > 50,
        "suspiciously few options: {}",
        known.len()
    );
}

#[test]
fn man_page_short_options_match_clap() {
    assert_eq!(man_page_options(), clap_options());
}

#[test]
fn help_lists_every_option() {
    let mut command = Cli::command();
    let long_help = command.render_long_help().to_string();
    let short_help = command.render_help().to_string();
    for (long, short) in clap_options() {
        let flag = format!("--{long}");
        assert!(long_help.contains(&flag), "--help lacks {flag}");
        assert!(short_help.contains(&flag), "-h lacks {flag}");
        if let Some(short) = short {
            assert!(
                long_help.contains(&format!("-{short}, ")),
                "--help lacks -{short}"
            );
        }
    }
}

#[test]
fn unknown_options_are_usage_errors_with_status_2() {
    for args in [
        &["--no-such-option"][..],
        &["-Z"],
        &["--pcap", "/tmp/capture"],
        &["--netns", "ns1"],
        &["positional"],
    ] {
        let argv = std::iter::once("baton").chain(args.iter().copied());
        let error = try_parse_args_from(argv).expect_err("must be refused");
        assert_eq!(error.exit_code(), 2, "{args:?}");
    }
}

#[test]
fn conflicting_options_are_usage_errors_with_status_2() {
    for args in [&["-4", "-6"][..], &["--socket", "/x", "--fd", "3"]] {
        let argv = std::iter::once("baton").chain(args.iter().copied());
        let error = try_parse_args_from(argv).expect_err("must be refused");
        assert_eq!(error.exit_code(), 2, "{args:?}");
    }
}

#[test]
fn capabilities_are_json_for_a_net_device() {
    let value: serde_json::Value = serde_json::from_str(CAPABILITIES_JSON).expect("valid JSON");
    assert_eq!(value["type"], "net");
}

#[test]
fn man_page_states_the_code_defaults() {
    let text = MAN_PAGE.replace("\\-", "-");
    assert!(text.contains(&format!("Default: {DEFAULT_LINGER_SECS}.")));
    assert!(text.contains(&format!("Default: {DEFAULT_MTU}.")));
    assert!(text.contains("Default: 9a:55:9a:55:9a:55."));
}

fn run_baton(args: &[&str]) -> std::process::Output {
    Process::new(env!("CARGO_BIN_EXE_baton"))
        .args(args)
        .output()
        .expect("run the baton binary")
}

#[test]
fn binary_prints_capabilities_as_json() {
    let output = run_baton(&["--print-capabilities"]);
    assert!(output.status.success(), "{output:?}");
    let value: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON on stdout");
    assert_eq!(value["type"], "net");
}

#[test]
fn binary_help_lists_every_option() {
    let output = run_baton(&["--help"]);
    assert!(output.status.success(), "{output:?}");
    let help = String::from_utf8_lossy(&output.stdout);
    for long in clap_options().keys() {
        assert!(help.contains(&format!("--{long}")), "--help lacks --{long}");
    }
}

#[test]
fn binary_exits_2_on_unknown_option() {
    let output = run_baton(&["--no-such-option"]);
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("--no-such-option"));
}
