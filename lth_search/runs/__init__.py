"""What a search trial is without Ray: its typed record, the runner, search state, summary."""
