/dev/fd/3: line 45: launch: command not found
new 127
