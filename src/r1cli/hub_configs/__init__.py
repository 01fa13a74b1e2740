"""The Hub `config.json` of every model alias (deepseek-ai's own files, unmodified), shipped so that `r1 show NAME`
can answer "does it fit?" before anything is downloaded. The files on the Hub win: a downloaded model reads its own."""
