"""Whatever generates the text, behind the one protocol in engines.base: built-in (Paddle), upstream, FastDeploy."""
