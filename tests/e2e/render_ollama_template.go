// Renders an Ollama TEMPLATE with Go's own text/template, the engine Ollama executes it with, over
// the data Ollama gives a template that uses .Messages (template/template.go: Execute): the
// messages, each with its Role and Content. Reads {"template": ..., "messages": [...]} on stdin.
package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

func main() {
	var input struct {
		Template string    `json:"template"`
		Messages []Message `json:"messages"`
	}
	if err := json.NewDecoder(os.Stdin).Decode(&input); err != nil {
		panic(err)
	}
	// Ollama parses with missingkey=zero (template/template.go: Parse).
	t := template.Must(template.New("").Option("missingkey=zero").Parse(input.Template))
	if err := t.Execute(os.Stdout, map[string]any{"Messages": input.Messages}); err != nil {
		panic(err)
	}
}
