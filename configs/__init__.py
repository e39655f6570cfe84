"""Named presets as frozen dataclasses; ablations are `dataclasses.replace` of these."""
