//! `pcibus completions SHELL` and `pcibus man`: generated from the clap definition of the
//! command line, so they list exactly the subcommands and options `pcibus` takes.

use clap::CommandFactory;

use super::*;

/// `pcibus completions SHELL`: the completion script for SHELL, on standard output.
pub(super) fn completions(out: &mut impl Write, shell: clap_complete::Shell) -> io::Result<()> {
    let mut cmd = Cli::command();
    let mut buf = Vec::new();
    clap_complete::generate(shell, &mut cmd, "pcibus", &mut buf);
    out.write_all(&buf)
}

/// `pcibus man`: the man page (roff), on standard output.
pub(super) fn man(out: &mut impl Write) -> io::Result<()> {
    let mut buf = Vec::new();
    clap_mangen::Man::new(Cli::command()).render(&mut buf)?;
    out.write_all(&buf)
}
